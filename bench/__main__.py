"""`python -m bench`: start every peer, run the scenarios alternately, write the report."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from . import alternation, capacity, client, procs, profiling, real, report
from .quiet import GATE
from .results import Row
from .run import Run

SCENARIOS = ("converters", "warm", "stream", "concurrency", "swap", "cold", "capacity",
             "footprint", "cache", "alternation", "peer")


QUICK = {"warm_rounds": 5, "stream_rounds": 2, "stream_tokens": 32, "conc_rounds": 1,
         "conc_tokens": 8, "clients": "16", "cold_rounds": 2, "swap_rounds": 2,
         "cap_rounds": 1, "cap_seconds": 1.0, "streams": 50, "cache_rounds": 1, "alt_rounds": 1,
         "alt_seconds": 4.0, "peer_rounds": 4}


def missing_tools(profile: bool) -> list[str]:
    """What `make bench` installs (pyproject's `bench` extra) and this venv lacks."""
    missing = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("matplotlib (the chart)")
    if profile and profiling.pyspy_path() is None:
        missing.append("py-spy (the profile; or pass --no-profile)")
    return missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny counts, no report "
                   "written unless --write")
    p.add_argument("--write", action="store_true", help="write docs/ even with --quick")
    p.add_argument("--no-write", action="store_true", help="only print the table")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma list of scenarios")
    p.add_argument("--model", type=Path, default=procs.DEFAULT_MODEL)
    p.add_argument("--warm-rounds", type=int, default=60)
    p.add_argument("--stream-rounds", type=int, default=12)
    p.add_argument("--stream-tokens", type=int, default=256)
    p.add_argument("--conc-rounds", type=int, default=4)
    p.add_argument("--conc-tokens", type=int, default=32)
    p.add_argument("--clients", default="16,64")
    p.add_argument("--cold-rounds", type=int, default=8)
    p.add_argument("--swap-rounds", type=int, default=10)
    p.add_argument("--alt-rounds", type=int, default=3)
    p.add_argument("--alt-seconds", type=float, default=20.0)
    p.add_argument("--cap-rounds", type=int, default=4)
    p.add_argument("--cache-rounds", type=int, default=3)
    p.add_argument("--peer-rounds", type=int, default=30)
    p.add_argument("--cap-seconds", type=float, default=3.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--busy", type=float, default=0.5, help="wait (bounded) before a round "
                   "while more than this share of the CPU is busy with other work; 1 = never")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, profiles)")
    p.add_argument("--ab", default=None, metavar="SRC[:EXTRA]",
                   help="also run routerd from this source tree as peer routerd-B (A/B a "
                        "change; more sys.path entries after ':')")
    p.add_argument("--md", type=Path, default=procs.ROOT / "docs/performance.md")
    p.add_argument("--png", type=Path, default=procs.ROOT / "docs/performance.png")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)  # smaller counts, still overridable one by one
    a = p.parse_args(argv)
    a.only = set(a.only.split(","))
    a.write_docs = not a.no_write and (a.write or not a.quick)
    return a


def converters(run: Run) -> None:
    from .translate import bench as translate_bench

    reps = 3 if run.args.quick else 7
    n = 2_000 if run.args.quick else 20_000
    us = [translate_bench(n)["us_per_chunk"] for _ in range(reps)]
    run.add([Row("converters alone: OpenAI SSE → Ollama NDJSON, per chunk",
                 "routerd translate", "µs/chunk", us, note=f"{n:,} chunks × {reps}")])


async def real_scenarios(run: Run) -> None:
    a, work = run.args, run.workdir
    direct = router = routerd = routerd_b = None
    try:
        direct = procs.start_direct(work, a.model)
        router = procs.start_router_mode(work, a.model, models_max=1)
        routerd = procs.start_routerd(work, procs.real_models_config(a.model))
        if a.ab:
            routerd_b = procs.start_routerd(work, procs.real_models_config(a.model),
                                            "routerd-B", src=a.ab)
        time.sleep(1.0)
        if run.want("footprint"):
            run.add([capacity.rss_row("routerd idle (2 models configured)", routerd),
                     capacity.rss_row("router-mode idle (2 models in dir)", router)])
        peers = real.RealPeers(direct, router, routerd, work, a.model, routerd_b)
        async with client.session() as http:
            await _real_timed(run, peers, http)
    finally:
        real.stop_all([routerd, routerd_b, router, direct])


async def _real_timed(run: Run, peers: real.RealPeers, http: aiohttp.ClientSession) -> None:
    a = run.args
    if run.want("warm"):
        run.load.note("warm")
        run.add(await real.warm(peers, http, a.warm_rounds))
        _note_argv(run, peers)
        if not a.no_profile:
            await _profile_warm(run, peers, http)
    if run.want("stream"):
        run.load.note("stream")
        run.add(await real.streaming(peers, http, a.stream_rounds, a.stream_tokens))
    if run.want("concurrency"):
        for c in (int(x) for x in a.clients.split(",") if x):
            run.load.note(f"concurrency {c}")
            run.add(await real.concurrency(peers, http, a.conc_rounds, a.conc_tokens, c))
    swap_rows: list[Row] = []
    if run.want("swap"):
        run.load.note("swap")
        swap_rows = await real.swap(peers, http, a.swap_rounds)
        run.add(swap_rows)
    if run.want("cold"):
        run.load.note("cold")
        cold_rows = await real.cold(peers, http, a.cold_rounds)
        real.finish_cold(cold_rows, swap_rows)
        run.add(cold_rows)


def _note_argv(run: Run, peers: real.RealPeers) -> None:
    """Check that routerd's worker runs exactly the flags direct llama-server got."""
    pids = procs.worker_pids(peers.routerd)
    if not pids:
        return
    got = procs.worker_argv(pids[0])
    want = procs.routerd_argv(peers.model, port=0, api_key="", alias="smol-a")
    def norm(argv: list[str]) -> list[str]:
        out, skip = [], False
        for x in argv[1:]:
            out.append("…" if skip else x)
            skip = x in ("--port", "--api-key", "--alias")
        return out
    same = norm(got) == norm(want)
    run.argv_notes.append("routerd's worker: `" + " ".join(norm(got)) + "`"
                          + (" (identical to direct's)" if same else " (DIFFERS from direct's)"))
    run.argv_notes.append("direct: `llama-server " + " ".join(norm(want)) + "`")
    child = procs.router_child_args(peers.router, "smol-a")
    if child:
        run.argv_notes.append("router mode's child: `" + " ".join(child[1:]) + "`")


async def _profile_warm(run: Run, peers: real.RealPeers, http: aiohttp.ClientSession) -> None:
    out = run.workdir / "profile-warm.raw"
    targets = [t for t in peers.targets() if t.peer.startswith("routerd")]
    n = 10 if run.args.quick else 60
    with profiling.record(peers.routerd.pid, out):
        for i in range(n):
            await client.chat(http, targets[i % 2], n=8)
    run.profiles["warm chat through routerd (/v1 and /api/chat alternately)"] = \
        profiling.summarize(out)


async def fake_scenarios(run: Run) -> None:
    a = run.args
    if not (run.want("capacity") or run.want("footprint")):
        return
    with capacity.fake_peers(run.workdir, a.connections, a.streams, a.ab) as peers:
        time.sleep(1.0)
        if run.want("footprint"):
            run.add([capacity.rss_row("routerd, 50 fake models configured", peers.routerd)])
        if run.want("capacity"):
            run.load.note("latency")
            run.add(await capacity.added_latency(peers, a.cap_rounds, a.cap_seconds))
            run.load.note("capacity")
            run.add(await capacity.capacity(peers, a.cap_rounds, a.cap_seconds, a.connections))
            if not a.no_profile:
                await _profile_capacity(run, peers)
        if run.want("footprint"):
            run.load.note("footprint")
            try:
                run.add([await capacity.open_streams(peers, a.streams)])
            except RuntimeError as e:  # reported, not fatal: the other results still count
                run.add([Row("daemon RSS", f"routerd, {a.streams} open streams", "MiB", [],
                             note=f"failed: {e}")])
            run.add([capacity.rss_row("routerd after all of the above", peers.routerd)])


async def _profile_capacity(run: Run, peers: capacity.FakePeers) -> None:
    from . import loadgen

    out = run.workdir / "profile-capacity.raw"
    with profiling.record(peers.routerd.pid, out):
        await loadgen.run(peers.routerd.base_url + "/v1/chat/completions", peers.body(), {},
                          connections=run.args.connections, seconds=run.args.cap_seconds)
    run.profiles["routing capacity through routerd (/v1, fake worker)"] = \
        profiling.summarize(out)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: peers get stopped


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _main(argv)
    finally:
        procs.stop_everything()


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if not args.model.is_file():
        print(f"model missing: {args.model} (run make install)", file=sys.stderr)
        return 2
    missing = missing_tools(not args.no_profile)
    if missing and args.write_docs:
        print("missing: " + ", ".join(missing) + " — run `make bench`, which installs "
              "pyproject's bench extra (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    GATE.threshold = args.busy
    t0 = time.monotonic()
    machine = report.machine(procs.BIN / "llama-server")
    with tempfile.TemporaryDirectory(prefix="routerd-bench-") as tmp:
        work = Path(tempfile.mkdtemp(prefix="routerd-bench-keep-")) if args.keep else Path(tmp)
        print(f"[bench] work dir {work}", file=sys.stderr, flush=True)
        run = Run(args, work)
        run.load.note("start")
        if run.want("converters"):
            converters(run)
        if run.want("warm") or run.want("stream") or run.want("concurrency") or \
                run.want("swap") or run.want("cold") or run.want("footprint"):
            asyncio.run(real_scenarios(run))
        asyncio.run(fake_scenarios(run))
        if run.want("cache"):
            from .prompt_cache import cache

            run.load.note("cache")
            run.add(asyncio.run(cache(work, args.model, args.cache_rounds)))
        if run.want("peer"):
            from .peer_hop import peer_hop

            run.load.note("peer")
            run.add(asyncio.run(peer_hop(work, args.model, args.peer_rounds)))
        if run.want("alternation"):
            run.load.note("alternation")
            run.add(asyncio.run(alternation.alternation(work, args.alt_rounds,
                                                        args.alt_seconds)))
        run.load.note("end")
    minutes = (time.monotonic() - t0) / 60
    print(f"\n{report.table(run.rows)}\n\nload average: {run.load.summary()}; "
          f"{GATE.summary()}; {minutes:.1f} min", flush=True)
    if args.write_docs:
        from .document import write

        write(run, machine, minutes)
    return 0 if run.rows else 1


if __name__ == "__main__":
    sys.exit(main())
