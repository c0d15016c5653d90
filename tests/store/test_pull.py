"""The registry client against a fake registry on loopback serving the real SmolLM2 GGUF."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from routerd.errors import BadRequest, Forbidden
from routerd.store.blobs import DigestMismatch, DownloadError, DownloadPolicy
from routerd.store.manifests import ManifestError
from routerd.store.pull import Puller
from routerd.store.store import Store
from tests.fakes.registry import FakeRegistry, sha256_file

pytestmark = pytest.mark.timeout(120)
MODEL = Path(os.environ.get("ROUTERD_TEST_MODEL",
                            Path.home() / ".cache/routerd/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
PART = 16 * 1024 * 1024
POLICY = DownloadPolicy(part_size=PART, concurrency=4, max_attempts=3, backoff=0.01,
                        flush_interval=0.05)


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    assert MODEL.is_file(), f"{MODEL} missing"
    async with FakeRegistry() as reg:
        reg.add_smollm2(MODEL)
        yield reg


@contextlib.asynccontextmanager
async def puller(store: Store, **kw: Any) -> AsyncIterator[Puller]:
    p = Puller(store, policy=kw.pop("policy", POLICY), progress_interval=0.05, **kw)
    try:
        yield p
    finally:
        await p.aclose()


async def collect(p: Puller, name: str, **kw: Any) -> list[dict[str, Any]]:
    return [e async for e in p.pull(name, insecure=True, **kw)]


def model_digest(reg: FakeRegistry) -> str:
    return sha256_file(MODEL)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_pull_progress_and_second_pull_downloads_nothing(
        registry: FakeRegistry, tmp_path: Path) -> None:
    store = Store(tmp_path / "models")
    name = f"{registry.host}/library/smollm2:latest"
    async with puller(store) as p:
        t0 = time.monotonic()
        events = await collect(p, name)
        took = time.monotonic() - t0
        size = MODEL.stat().st_size
        print(f"\npull over loopback: {size / 1e6:.1f} MB in {took:.2f} s "
              f"= {size / took / 1e6:.0f} MB/s (incl. manifest, 5 small layers, SHA-256)")
        statuses = [e["status"] for e in events]
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        layer_events = [e for e in events if e["status"].startswith("pulling ")][1:]
        assert all(set(e) <= {"status", "digest", "total", "completed"} for e in events)
        for e in layer_events:
            assert e["status"] == f"pulling {e['digest'][7:19]}" and e["total"] > 0
        finals = {e["digest"]: e for e in layer_events}
        assert len(finals) == 6  # model, template, system, params, license + config
        assert all(e["completed"] == e["total"] for e in finals.values())
        assert registry.served[model_digest(registry)] == size

        m = store.resolve(name)
        assert m is not None and m.name == name and not m.readonly
        assert hashlib.sha256(m.gguf_path.read_bytes()).hexdigest() == model_digest(registry)
        assert m.params == {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2}
        assert m.system == "You are a helpful assistant." and "im_start" in (m.template or "")
        assert m.details["family"] == "llama" and m.details["quantization_level"] == "Q4_1"
        assert [x.name for x in store.list_models()] == [name]
        assert not [f for f in files_under(tmp_path) if "partial" in f]

        registry.reset_counters()
        again = await collect(p, name)
        assert registry.served_total == 0
        assert [e["status"] for e in again][-1] == "success"


async def test_token_flow(tmp_path: Path) -> None:
    async with FakeRegistry(token=True) as reg:
        reg.add_smollm2(MODEL)
        async with puller(Store(tmp_path)) as p:
            events = await collect(p, f"{reg.host}/library/smollm2")
        assert events[-1] == {"status": "success"}
        assert reg.token_requests == 1  # one token, reused for every blob


async def test_token_realm_on_another_host_is_refused(tmp_path: Path) -> None:
    async with FakeRegistry(token=True) as reg:
        reg.add_smollm2(MODEL)
        reg.realm_host = f"localhost:{reg.port}"  # same server, other host name
        async with puller(Store(tmp_path / "models")) as p:
            with pytest.raises(Forbidden, match="token realm host 'localhost' does not match"):
                await collect(p, f"{reg.host}/library/smollm2")
        assert reg.token_requests == 0
        assert files_under(tmp_path) == []


async def test_corrupt_blob_fails_and_leaves_nothing(
        registry: FakeRegistry, tmp_path: Path) -> None:
    want = model_digest(registry)
    registry.faults.corrupt.add(want)
    data = bytearray(MODEL.read_bytes())
    data[len(data) // 2] ^= 0xFF
    got = hashlib.sha256(data).hexdigest()
    store = Store(tmp_path / "models")
    async with puller(store) as p:
        with pytest.raises(DigestMismatch) as e:
            await collect(p, f"{registry.host}/library/smollm2")
    assert e.value.message == ("digest mismatch, file must be downloaded again: "
                               f"want sha256:{want}, got sha256:{got}")
    left = files_under(tmp_path)
    assert not [f for f in left if want in f or "manifests" in f], left


async def test_cut_at_40_percent_resumes_after_restart(
        registry: FakeRegistry, tmp_path: Path) -> None:
    size, digest = MODEL.stat().st_size, model_digest(registry)
    cut = int(size * 0.4)
    registry.faults.cut_after, registry.faults.refuse_after_cut = cut, True
    store = Store(tmp_path / "models")
    name = f"{registry.host}/library/smollm2"
    async with puller(store, policy=DownloadPolicy(**{**POLICY.__dict__, "max_attempts": 2})) as p:
        with pytest.raises(DownloadError):
            await collect(p, name)
    sidecar = store.blobs_dir / f"sha256-{digest}-partial.json"
    persisted = sum(c for _, _, c in json.loads(sidecar.read_text())["parts"])
    assert 0 < persisted <= cut

    registry.faults.reset()
    registry.reset_counters()
    async with puller(Store(tmp_path / "models")) as p:  # a fresh Puller: as after a restart
        events = await collect(p, name)
    assert events[-1] == {"status": "success"}
    after = registry.served[digest]
    print(f"\nresume: cut at {cut} B ({cut / size:.0%}); {persisted} B were on disk; "
          f"fetched {after} B after the restart = size - {size - after} "
          f"({after / size:.1%} of {size} B; ideal size-cut = {size - cut})")
    assert after == size - persisted  # exactly the missing bytes, nothing twice
    assert abs(after - (size - cut)) <= PART
    assert not sidecar.exists()


async def test_cut_connection_is_retried_in_the_same_pull(
        registry: FakeRegistry, tmp_path: Path) -> None:
    registry.faults.cut_after = int(MODEL.stat().st_size * 0.3)
    async with puller(Store(tmp_path)) as p:
        events = await collect(p, f"{registry.host}/library/smollm2")
    assert events[-1] == {"status": "success"} and registry.faults.cut_done


async def test_stalled_part_is_retried(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.faults.stall_after = 2 * 1024 * 1024
    async with puller(Store(tmp_path), stall_timeout=0.5) as p:
        events = await collect(p, f"{registry.host}/library/smollm2")
    assert events[-1] == {"status": "success"} and registry.faults.stall_done
    gets = [r for r in registry.requests if r[0] == "GET" and model_digest(registry) in r[1]]
    assert len(gets) > -(-MODEL.stat().st_size // PART)  # one more than the parts: the retry


async def test_concurrent_pulls_fetch_once(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.faults.delay = 0.002
    name = f"{registry.host}/library/smollm2"
    async with puller(Store(tmp_path)) as p:
        a, b = await asyncio.gather(collect(p, name), collect(p, name))
    assert a[-1] == b[-1] == {"status": "success"}
    assert registry.served[model_digest(registry)] == MODEL.stat().st_size


async def test_one_client_leaving_does_not_stop_the_other(
        registry: FakeRegistry, tmp_path: Path) -> None:
    registry.faults.delay = 0.004
    name, digest = f"{registry.host}/library/smollm2", model_digest(registry)
    async with puller(Store(tmp_path)) as p:
        async def leaver() -> int:
            async with contextlib.aclosing(p.pull(name, insecure=True)) as events:
                async for e in events:
                    if e.get("digest", "").endswith(digest) and e.get("completed", 0) > 0:
                        return e["completed"]
            raise AssertionError("no progress seen")

        stayer = asyncio.create_task(collect(p, name))
        left_at = await leaver()
        events = await stayer
    assert left_at < MODEL.stat().st_size
    assert events[-1] == {"status": "success"}
    assert registry.served[digest] == MODEL.stat().st_size  # not restarted


async def test_last_client_leaving_cancels_and_the_next_pull_resumes(
        registry: FakeRegistry, tmp_path: Path) -> None:
    registry.faults.delay = 0.004
    name, digest, size = f"{registry.host}/library/smollm2", model_digest(registry), 0
    store = Store(tmp_path)
    async with puller(store) as p:
        async with contextlib.aclosing(p.pull(name, insecure=True)) as events:
            async for e in events:
                if e.get("completed", 0) > 10_000_000:
                    break
        await asyncio.wait_for(asyncio.gather(*[f.task for f in p._flights.values()],
                                              return_exceptions=True), 10)
    state = json.loads((store.blobs_dir / f"sha256-{digest}-partial.json").read_text())
    persisted = sum(c for _, _, c in state["parts"])
    registry.faults.delay, size = 0, MODEL.stat().st_size
    registry.reset_counters()
    async with puller(store) as p:
        assert (await collect(p, name))[-1] == {"status": "success"}
    assert registry.served[digest] == size - persisted and persisted > 10_000_000


def test_insecure_and_allow_list(tmp_path: Path) -> None:
    p = Puller(Store(tmp_path), allow_hosts=["registry.ollama.ai", "hf.co"])
    with pytest.raises(BadRequest, match="insecure protocol http"):
        p.check("http://registry.ollama.ai/library/smollm2")
    with pytest.raises(Forbidden, match="not in registries.allow"):
        p.check("127.0.0.1:9/library/smollm2", insecure=True)
    assert str(p.check("smollm2").base) == "https://registry.ollama.ai"
    assert str(p.check("hf.co/u/r:Q4_K_M").base) == "https://hf.co"
    assert str(p.check("http://registry.ollama.ai/library/x", insecure=True).base).startswith(
        "http://")
    for bad in ("../../etc/passwd", "library/../../x", "a/b/c/d", "x:../y"):
        with pytest.raises(BadRequest):
            p.check(bad)


async def test_manifest_that_climbs_out_is_refused(
        registry: FakeRegistry, tmp_path: Path) -> None:
    evil = json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model",
         "digest": "sha256:../../../../../../tmp/pwned", "size": 4}]}).encode()
    registry.add_raw_manifest("library", "evil", "latest", evil)
    async with puller(Store(tmp_path / "models")) as p:
        with pytest.raises(ManifestError, match="invalid digest"):
            await collect(p, f"{registry.host}/library/evil")
    assert files_under(tmp_path) == []
    assert not Path("/tmp/pwned").exists()


async def test_moved_tag_removes_unused_layers(registry: FakeRegistry, tmp_path: Path) -> None:
    store = Store(tmp_path)
    name = f"{registry.host}/library/smollm2"
    async with puller(store) as p:
        await collect(p, name)
        old_system = hashlib.sha256(b"You are a helpful assistant.").hexdigest()
        registry.add_smollm2(MODEL, system="You are terse.")
        events = await collect(p, name)
    assert "removing unused layers" in [e["status"] for e in events]
    assert not store.blob_path(old_system).exists()
    assert store.blob_path(model_digest(registry)).exists()
    m = store.resolve(name)
    assert m is not None and m.system == "You are terse."


async def test_direct_gguf_url(registry: FakeRegistry, tmp_path: Path) -> None:
    url = registry.add_file("SmolLM2-135M-Instruct.Q4_1.gguf", registry.add_blob_file(MODEL))
    store = Store(tmp_path)
    async with puller(store) as p:
        events = await collect(p, url)
        assert [e["status"] for e in events][-4:] == [
            "verifying sha256 digest", "parsing GGUF", "writing manifest", "success"]
        assert events[0] == {"status": "pulling SmolLM2-135M-Instruct.Q4_1.gguf"}
        m = store.resolve(f"{registry.host}/url/SmolLM2-135M-Instruct.Q4_1")
        assert m is not None and m.name == f"{registry.host}/url/SmolLM2-135M-Instruct.Q4_1:latest"
        assert m.gguf_path.name == f"sha256-{model_digest(registry)}"
        assert m.details["family"] == "llama"
        registry.reset_counters()
        again = await collect(p, url)
    assert again[-1] == {"status": "success"} and registry.served_total == 0


def test_realm_host_rule() -> None:
    from yarl import URL

    from routerd.store.pull import _same_host

    reg = URL("https://hf.co/v2/u/r/manifests/latest")
    assert _same_host(URL("https://huggingface.co/v2/token"), reg)  # the Hub's alias
    assert _same_host(URL("https://hf.co/token"), reg)
    assert not _same_host(URL("https://registry.ollama.ai/v2/token"), reg)
    assert not _same_host(URL("https://hf.co:8443/token"), reg)
    local = URL("http://127.0.0.1:5000/v2/x")
    assert _same_host(URL("http://127.0.0.1:5000/token"), local)
    assert not _same_host(URL("http://127.0.0.1:5001/token"), local)
    assert not _same_host(URL("http://localhost:5000/token"), local)


_ENOSPC_PULL = """
import asyncio, json, os, sys
from pathlib import Path
from routerd.store.pull import Puller
from routerd.store.store import Store

async def main():
    p = Puller(Store(Path(sys.argv[1])))
    try:
        async for _ in p.pull(sys.argv[2], insecure=True):
            pass
        return {"error": None}
    except Exception as e:
        return {"error": getattr(e, "message", str(e)), "status": getattr(e, "status", 0)}
    finally:
        await p.aclose()

out = asyncio.run(main())
out["left"] = sorted(str(q.relative_to(sys.argv[1])) for q in Path(sys.argv[1]).rglob("*")
                     if q.is_file())
print(json.dumps(out))
"""


async def test_disk_full_pull_fails_cleanly(registry: FakeRegistry, tmp_path: Path) -> None:
    """A real ENOSPC: models_dir on a 64 MiB tmpfs (private mount namespace; needs root)."""
    import shutil
    import sys

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    root = Path(__file__).resolve().parents[2]
    cmd = (f"mount -t tmpfs -o size=64m tmpfs {mnt} && cd {root} && exec {sys.executable} -c "
           f"'{_ENOSPC_PULL}' {mnt} {registry.host}/library/smollm2")
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-m", "sh", "-c", cmd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0 and b"mount" in err:
        pytest.skip(f"cannot mount tmpfs here: {err.decode()[:200]}")
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["status"] == 507
    assert result["error"].startswith(f"no space left on device for sha256:{sha256_file(MODEL)}")
    assert result["left"] == []  # no partial, no sidecar, no blob, no manifest
