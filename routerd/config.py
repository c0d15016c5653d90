"""Configuration: frozen dataclasses, loaded once by the CLI.

`load_config(path)` reads YAML, applies `ROUTERD_*` environment overrides and validates every
key; a problem raises `ConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

BACKENDS = ("auto", "llama-server", "llamafile", "llama-cpp-python", "command")
DEFAULT_CORS = (
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://[::1]",
    "http://[::1]:*",
    "app://*",
    "file://*",
)


class ConfigError(ValueError):
    def __init__(self, key: str, message: str, file: str | None = None) -> None:
        self.key, self.file, self.reason = key, file, message
        where = f"{file}: " if file else ""
        super().__init__(f"config error: {where}{key}: {message}")


# ---------------------------------------------------------------- durations and sizes

_DURATION_RE = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# Longer than this is forever (Ollama treats huge keep_alive values so): no wall-clock
# deadline past what a datetime can hold, no float overflow from 10**400.
FOREVER_AFTER = 1e9  # seconds, about 31 years


def parse_duration(value: Any, key: str = "duration") -> float:
    """Ollama keep_alive semantics: a number is seconds, a string is a Go duration
    ("5m", "1h30m", "10s"); negative means forever (returned as +inf), and so does anything
    longer than FOREVER_AFTER; 0 means now."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(key, f"expected a duration like '5m' or seconds, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float: forever, or forever ago
            seconds = math.inf if value > 0 else -math.inf
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            pos, seconds = 0, 0.0
            for m in _DURATION_RE.finditer(body):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
                pos = m.end()
            if pos != len(body) or not body:
                raise ConfigError(key, f"invalid duration {value!r} (use e.g. 30s, 5m, 1h, -1)")
            seconds *= sign
    else:
        raise ConfigError(key, f"expected a duration, got {type(value).__name__}")
    if math.isnan(seconds):
        raise ConfigError(key, "duration is NaN")
    return math.inf if seconds < 0 or seconds > FOREVER_AFTER else seconds


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|[KMGT]|B)?\s*$", re.IGNORECASE)
_SIZE_MULT = {
    "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from an int or a string like '512MiB', '12GiB', '4GB'."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, "size must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_MULT[(m.group(2) or "b").lower()])
    raise ConfigError(key, f"invalid size {value!r} (use bytes or e.g. 512MiB, 12GiB)")


@dataclass(frozen=True)
class Budget:
    """A budget as a fraction of the total, or as absolute bytes."""

    percent: float | None = None
    bytes: int | None = None

    def resolve(self, total: int) -> int:
        if self.bytes is not None:
            return self.bytes
        return int(total * (self.percent if self.percent is not None else 100.0) / 100.0)

    @staticmethod
    def parse(value: Any, key: str) -> Budget:
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                pct = float(value.strip()[:-1])
            except ValueError:
                raise ConfigError(key, f"invalid percentage {value!r}") from None
            if not 0 < pct <= 100:
                raise ConfigError(key, "percentage must be in (0, 100]")
            return Budget(percent=pct)
        return Budget(bytes=parse_size(value, key))


# ---------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class GpuBudget:
    index: int
    budget: Budget


@dataclass(frozen=True)
class MemoryConfig:
    ram_budget: Budget = Budget(percent=75.0)
    gpus: str | tuple[GpuBudget, ...] = "auto"  # "auto" | explicit list | () = none
    gpu_reserve: int = 512 * 1024**2
    release_timeout: float = 10.0


@dataclass(frozen=True)
class EnginesConfig:
    llama_server: str = "auto"


@dataclass(frozen=True)
class AuthConfig:
    api_keys_file: str | None = None
    exempt_loopback: bool = True
    metrics_public: bool = False  # /metrics without a key (else admin keys only)


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class RegistriesConfig:
    allow: tuple[str, ...] | None = None  # None = any host
    insecure: bool = False


@dataclass(frozen=True)
class DiscoveryConfig:
    ollama: bool = True
    gpt4all: bool = True
    lmstudio: bool = True
    huggingface: bool = True
    llama_cpp: bool = True


@dataclass(frozen=True)
class TimeoutsConfig:
    load: float = 120.0  # spawn → /health 200
    stop: float = 10.0  # SIGTERM → SIGKILL
    drain: float = 30.0  # in-flight requests at stop/shutdown
    probe_interval: float = 10.0  # liveness probe after ready
    probe_timeout: float = 5.0
    request_idle: float = 300.0  # a stream with no byte from the engine for this long → hung
    client_idle: float = 60.0  # a client connection without a whole request this long → closed


@dataclass(frozen=True)
class CacheConfig:
    """Prompt caches kept across swaps (routerd/scheduler/cache.py)."""

    enabled: bool = True
    disk_budget: int = 4 * 1024**3  # all models' saved slots together; LRU files go first
    save_timeout: float = 5.0  # the saves before a stop, together (and never past timeouts.stop)
    restore_timeout: float = 10.0  # the restores after a load, together


@dataclass(frozen=True)
class CpuConfig:
    threads: int = 0  # the CPU budget shared by loaded workers; 0 = physical cores
    gpu_threads: int = 1  # what a fully GPU-offloaded worker books


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model: str
    backend: str = "auto"
    ctx_size: int = 4096
    parallel: int = 1
    gpu_layers: int | str = "auto"
    keep_alive: float | None = None  # None → global default
    aliases: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = ()  # backend "command": argv with {port} {host} {model} {api_key}
    preload: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    system: str | None = None
    embeddings: bool = True
    rerank: bool | None = None  # serve /v1/rerank (llama-server --reranking); None = the GGUF says
    replicas: int = 1  # local engines serving this name (e.g. one per GPU), each booked
    keep_cache: bool = True  # save its prompt cache (llama-server slots) across swaps
    gpus: tuple[int, ...] | None = None  # `gpu: N` or `gpus: [..]` pins; None = any GPU
    rpc: tuple[str, ...] = ()  # llama.cpp rpc-servers ("host:port") its layers go to
    # (`rpc: true` in the file: the top-level rpc_pool)


@dataclass(frozen=True)
class SwapBatch:
    """How far requests for a loaded model may overtake a load waiting for its room: at most
    `requests` of them, and only within `wait` seconds of that load's request (0 and 0: plain
    arrival order). Requests that came before the waiting load are served first either way."""

    requests: int = 8
    wait: float = 10.0


PEER_KINDS = ("auto", "routerd", "ollama", "llama-server", "openai")


@dataclass(frozen=True)
class PeerConfig:
    """Another host whose models routerd serves (routerd/peers/): polled, then forwarded to."""

    name: str  # also the `name/model` prefix that always reaches this peer
    url: str  # base URL; for kind openai the API root (usually ending in /v1)
    kind: str = "auto"  # one of PEER_KINDS; auto = detected by probing
    api_key: str | None = None  # sent to the peer (never the client's key)
    api_key_file: str | None = None
    models: tuple[str, ...] = ("*",)  # globs over the peer's model names
    prefix: str = ""  # prepended to the peer's model names in routerd's catalog
    weight: float = 1.0  # share of the load among replicas
    interval: float = 10.0  # poll period while up; backoff while down tops out here
    timeout: float = 5.0  # one poll request
    backoff: float = 0.5  # the first retry after a failure, doubling up to `interval`


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 11434
    models_dir: str = "~/.local/share/routerd/models"
    ollama_models_dir: str | None = None
    state_dir: str = "~/.local/state/routerd"
    default_model: str | None = None
    keep_alive: float = 300.0
    max_queue: int = 512
    max_loaded: int = 0
    swap_batch: SwapBatch = SwapBatch()
    min_resident: float = 5.0  # a model that displaced another is not cut off for it sooner
    abort_unwanted_loads: bool = False  # cancel a load once no request waits for it
    max_body: int = 8 * 1024**2
    memory: MemoryConfig = MemoryConfig()
    cache: CacheConfig = CacheConfig()
    cpu: CpuConfig = CpuConfig()
    engines: EnginesConfig = EnginesConfig()
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    registries: RegistriesConfig = RegistriesConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    model_dirs: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = DEFAULT_CORS
    log_level: str = "info"
    rpc_pool: tuple[str, ...] = ()  # rpc-servers for models with `rpc: true`
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    peers: tuple[PeerConfig, ...] = ()
    source: str | None = None  # the file it came from

    def expand(self, p: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(p)))


# ---------------------------------------------------------------- parsing


class _Reader:
    """Pulls typed values out of a mapping, naming the dotted key on any error."""

    def __init__(self, data: Mapping[str, Any], prefix: str, known: set[str]) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(prefix or "<root>", "expected a mapping")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{prefix}{unknown[0]}", "unknown key")
        self.data, self.prefix = data, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if name not in self.data or self.data[name] is None and default is None:
            return default
        value = self.data[name]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ConfigError(self.key(name), f"expected {names}, got {value!r}")
        return value

    def positive_int(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.get(name, int, default)
        if value < minimum:
            raise ConfigError(self.key(name), f"must be an integer >= {minimum}, got {value}")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, None)
        if value is None:
            return default
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(self.key(name), "expected a list of strings")
        return tuple(value)


_MODEL_KEYS = {f for f in ModelConfig.__dataclass_fields__ if f != "name"} | {"gpu"}
_TOP_KEYS = {f for f in Config.__dataclass_fields__ if f != "source"}


def _parse_model(name: str, data: Any, file: str | None,
                 rpc_pool: tuple[str, ...] = ()) -> ModelConfig:
    key = f"models.{name}."
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", name):
        raise ConfigError(f"models.{name}", "invalid model name", file)
    try:
        r = _Reader(data or {}, key, _MODEL_KEYS)
        backend = r.get("backend", str, ModelConfig.backend)
        if backend not in BACKENDS:
            raise ConfigError(r.key("backend"), f"must be one of {', '.join(BACKENDS)}")
        command = r.strings("command", ())
        if backend == "command" and not command:
            raise ConfigError(r.key("command"), "backend 'command' needs a command list")
        model = r.get("model", str, None)
        if not model and backend != "command":
            raise ConfigError(r.key("model"), "required: a .gguf path, a pulled name or a llamafile")
        gpu_layers = r.get("gpu_layers", (int, str), ModelConfig.gpu_layers)
        if isinstance(gpu_layers, str) and gpu_layers != "auto":
            raise ConfigError(r.key("gpu_layers"), "must be an integer or 'auto'")
        pinned = _parse_gpu_pin(r)
        keep_alive = None
        if "keep_alive" in r.data:
            keep_alive = parse_duration(r.data["keep_alive"], r.key("keep_alive"))
        aliases = r.strings("aliases", ())
        return ModelConfig(
            name=name,
            model=model or "",
            backend=backend,
            ctx_size=r.positive_int("ctx_size", ModelConfig.ctx_size, 16),
            parallel=r.positive_int("parallel", ModelConfig.parallel),
            gpu_layers=gpu_layers,
            keep_alive=keep_alive,
            aliases=aliases,
            args=r.strings("args", ()),
            command=command,
            preload=r.get("preload", bool, ModelConfig.preload),
            options=dict(r.get("options", dict, {})),
            system=r.get("system", str, None),
            embeddings=r.get("embeddings", bool, ModelConfig.embeddings),
            rerank=r.get("rerank", bool, None),
            replicas=r.positive_int("replicas", ModelConfig.replicas),
            keep_cache=r.get("keep_cache", bool, ModelConfig.keep_cache),
            gpus=pinned,
            rpc=_parse_rpc(r, backend, rpc_pool),
        )
    except ConfigError as e:
        raise ConfigError(e.key, e.reason, file) from None


def _parse_rpc(r: _Reader, backend: str, pool: tuple[str, ...]) -> tuple[str, ...]:
    """`rpc: ["10.0.0.2:50052", ...]`, or `rpc: true` for the top-level rpc_pool: llama-server's
    --rpc (README: Several hosts)."""
    if r.data.get("rpc") is True:
        if not pool:
            raise ConfigError(r.key("rpc"), "rpc: true needs a top-level rpc_pool list")
        endpoints = pool
    elif r.data.get("rpc") is False:
        endpoints = ()
    else:
        endpoints = _rpc_endpoints(r.strings("rpc", ()), r.key("rpc"))
    if endpoints and backend not in ("auto", "llama-server"):
        raise ConfigError(r.key("rpc"), "needs backend llama-server (its --rpc)")
    return endpoints


def _rpc_endpoints(endpoints: tuple[str, ...], key: str) -> tuple[str, ...]:
    """host:port each, no repeats. llama.cpp splits at the first ':', so no IPv6 literals."""
    for e in endpoints:
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})", e)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise ConfigError(key, f"expected host:port (IPv4 or a host name), got {e!r}")
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(key, "an endpoint is listed twice")
    return endpoints


def _parse_gpu_pin(r: _Reader) -> tuple[int, ...] | None:
    """`gpu: 1` or `gpus: [0, 1]`: the NVML indices a model may use (one of them, or split
    over them); `gpus: []` keeps it off every GPU."""
    if "gpu" in r.data and "gpus" in r.data:
        raise ConfigError(r.key("gpus"), "set gpu or gpus, not both")
    if "gpu" in r.data:
        return (r.positive_int("gpu", 0, 0),)
    value = r.get("gpus", list, None)
    if value is None:
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ConfigError(r.key("gpus"), "expected a list of GPU indices (integers >= 0)")
    if len(set(value)) != len(value):
        raise ConfigError(r.key("gpus"), "a GPU index is listed twice")
    return tuple(value)


def _parse_swap_batch(value: Any) -> SwapBatch:
    """`swap_batch: 8` (a count), `swap_batch: 20s` (a wait), or `{requests: 8, wait: 20s}`;
    a count alone has no time bound, a wait alone no count bound."""
    if isinstance(value, bool):
        raise ConfigError("swap_batch", "must be a count, a duration or {requests, wait}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError("swap_batch", f"must be >= 0, got {value}")
        return SwapBatch(value, math.inf)
    if isinstance(value, (str, float)):
        return SwapBatch(2**31, parse_duration(value, "swap_batch"))
    if isinstance(value, dict):
        r = _Reader(value, "swap_batch.", {"requests", "wait"})
        wait = r.data.get("wait", SwapBatch.wait)
        return SwapBatch(r.positive_int("requests", SwapBatch.requests, 0),
                         parse_duration(wait, "swap_batch.wait"))
    raise ConfigError("swap_batch", "must be a count, a duration or {requests, wait}")


def parse_config(data: Mapping[str, Any] | None, file: str | None = None) -> Config:
    data = data or {}
    try:
        r = _Reader(data, "", _TOP_KEYS)
        mem = r.get("memory", dict, {})
        mr = _Reader(mem, "memory.", {"ram_budget", "gpus", "gpu_reserve", "release_timeout"})
        gpus_raw = mem.get("gpus", "auto")
        gpus: str | tuple[GpuBudget, ...]
        if gpus_raw == "auto":
            gpus = "auto"
        elif isinstance(gpus_raw, list):
            parsed = []
            for i, g in enumerate(gpus_raw):
                gr = _Reader(g, f"memory.gpus[{i}].", {"index", "budget"})
                parsed.append(GpuBudget(gr.positive_int("index", 0, 0),
                                        Budget.parse(g.get("budget", "100%"), gr.key("budget"))))
            gpus = tuple(parsed)
        else:
            raise ConfigError("memory.gpus", "must be 'auto', [] or a list of {index, budget}")
        memory = MemoryConfig(
            ram_budget=Budget.parse(mem.get("ram_budget", "75%"), "memory.ram_budget"),
            gpus=gpus,
            gpu_reserve=parse_size(mem.get("gpu_reserve", MemoryConfig.gpu_reserve),
                                   "memory.gpu_reserve"),
            release_timeout=float(mr.get("release_timeout", (int, float),
                                         MemoryConfig.release_timeout)),
        )
        er = _Reader(r.get("engines", dict, {}), "engines.", {"llama_server"})
        ar = _Reader(r.get("auth", dict, {}), "auth.", set(AuthConfig.__dataclass_fields__))
        tr = _Reader(r.get("tls", dict, {}), "tls.", {"cert_file", "key_file"})
        tls = TlsConfig(tr.get("cert_file", str, None), tr.get("key_file", str, None))
        if bool(tls.cert_file) != bool(tls.key_file):
            raise ConfigError("tls", "set both cert_file and key_file, or neither")
        rr = _Reader(r.get("registries", dict, {}), "registries.", {"allow", "insecure"})
        allow = rr.strings("allow", ()) if "allow" in rr.data else None
        dr = _Reader(r.get("discovery", dict, {}), "discovery.",
                     set(DiscoveryConfig.__dataclass_fields__))
        tor = _Reader(r.get("timeouts", dict, {}), "timeouts.",
                      set(TimeoutsConfig.__dataclass_fields__))
        timeouts = TimeoutsConfig(**{
            k: parse_duration(tor.data[k], tor.key(k)) for k in tor.data
        })
        models_raw = r.get("models", dict, {})
        rpc_pool = _rpc_endpoints(r.strings("rpc_pool", ()), "rpc_pool")
        models = {name: _parse_model(name, spec, file, rpc_pool)
                  for name, spec in models_raw.items()}
        _check_names(models)
        default_model = r.get("default_model", str, None)
        if default_model and models and not any(
            default_model == m.name or default_model in m.aliases for m in models.values()
        ) and "/" not in default_model and ":" not in default_model:
            raise ConfigError("default_model", f"{default_model!r} is not a configured model")
        host = r.get("host", str, Config.host)
        port = r.get("port", int, Config.port)
        if not 0 <= port <= 65535:
            raise ConfigError("port", f"must be 0..65535, got {port}")
        return Config(
            host=host,
            port=port,
            models_dir=r.get("models_dir", str, Config.models_dir),
            ollama_models_dir=r.get("ollama_models_dir", str, None),
            state_dir=r.get("state_dir", str, Config.state_dir),
            default_model=default_model,
            keep_alive=parse_duration(data.get("keep_alive", Config.keep_alive), "keep_alive"),
            max_queue=r.positive_int("max_queue", Config.max_queue),
            max_loaded=r.positive_int("max_loaded", Config.max_loaded, 0),
            swap_batch=_parse_swap_batch(data.get("swap_batch", {})),
            min_resident=parse_duration(data.get("min_resident", Config.min_resident),
                                        "min_resident"),
            abort_unwanted_loads=r.get("abort_unwanted_loads", bool, False),
            max_body=parse_size(data.get("max_body", Config.max_body), "max_body"),
            memory=memory,
            engines=EnginesConfig(er.get("llama_server", str, EnginesConfig.llama_server)),
            auth=AuthConfig(ar.get("api_keys_file", str, None),
                            ar.get("exempt_loopback", bool, AuthConfig.exempt_loopback),
                            ar.get("metrics_public", bool, AuthConfig.metrics_public)),
            tls=tls,
            registries=RegistriesConfig(allow, rr.get("insecure", bool, False)),
            discovery=DiscoveryConfig(**{k: dr.get(k, bool, True) for k in dr.data}),
            timeouts=timeouts,
            cache=_parse_cache(r.get("cache", dict, {})),
            cpu=_parse_cpu(r.get("cpu", dict, {})),
            model_dirs=r.strings("model_dirs", ()),
            allowed_hosts=r.strings("allowed_hosts", ()),
            cors_origins=r.strings("cors_origins", DEFAULT_CORS),
            log_level=r.get("log_level", str, Config.log_level),
            rpc_pool=rpc_pool,
            models=models,
            peers=_parse_peers(r.get("peers", list, [])),
            source=file,
        )
    except ConfigError as e:
        if e.file is None and file is not None:
            raise ConfigError(e.key, e.reason, file) from None
        raise


def _parse_cache(data: Mapping[str, Any]) -> CacheConfig:
    r = _Reader(data, "cache.", set(CacheConfig.__dataclass_fields__))
    d = CacheConfig()
    return CacheConfig(
        enabled=r.get("enabled", bool, d.enabled),
        disk_budget=parse_size(data.get("disk_budget", d.disk_budget), "cache.disk_budget"),
        save_timeout=parse_duration(data.get("save_timeout", d.save_timeout),
                                    "cache.save_timeout"),
        restore_timeout=parse_duration(data.get("restore_timeout", d.restore_timeout),
                                       "cache.restore_timeout"))


def _parse_cpu(data: Mapping[str, Any]) -> CpuConfig:
    r = _Reader(data, "cpu.", set(CpuConfig.__dataclass_fields__))
    return CpuConfig(threads=r.positive_int("threads", CpuConfig.threads, 0),
                     gpu_threads=r.positive_int("gpu_threads", CpuConfig.gpu_threads))


def _parse_peers(items: list[Any]) -> tuple[PeerConfig, ...]:
    peers: list[PeerConfig] = []
    for i, item in enumerate(items):
        r = _Reader(item, f"peers[{i}].", set(PeerConfig.__dataclass_fields__))
        name = r.get("name", str, "")
        if not name or "/" in name or name.strip() != name:
            raise ConfigError(r.key("name"), f"a non-empty name without '/' or spaces is required, got {name!r}")
        if any(p.name == name for p in peers):
            raise ConfigError(r.key("name"), f"{name!r} is already the name of another peer")
        url = r.get("url", str, "").rstrip("/")
        if not re.match(r"^https?://[^/\s]+", url):
            raise ConfigError(r.key("url"), f"an http:// or https:// URL is required, got {url!r}")
        kind = r.get("kind", str, PeerConfig.kind)
        if kind not in PEER_KINDS:
            raise ConfigError(r.key("kind"), f"must be one of {', '.join(PEER_KINDS)}, got {kind!r}")
        key, key_file = r.get("api_key", str, None), r.get("api_key_file", str, None)
        if key and key_file:
            raise ConfigError(r.key("api_key_file"), "set api_key or api_key_file, not both")
        if key_file and not os.path.isfile(os.path.expanduser(key_file)):
            raise ConfigError(r.key("api_key_file"), f"no such file: {key_file}")
        weight = r.get("weight", (int, float), PeerConfig.weight)
        if weight <= 0:
            raise ConfigError(r.key("weight"), f"must be > 0, got {weight}")
        times = {k: parse_duration(item.get(k, getattr(PeerConfig, k)), r.key(k))
                 for k in ("interval", "timeout", "backoff")}
        for k, v in times.items():
            if v <= 0:
                raise ConfigError(r.key(k), f"must be > 0, got {item.get(k)!r}")
        peers.append(PeerConfig(name=name, url=url, kind=kind, api_key=key, api_key_file=key_file,
                                models=r.strings("models", PeerConfig.models),
                                prefix=r.get("prefix", str, ""), weight=float(weight), **times))
    return tuple(peers)


def _check_names(models: Mapping[str, ModelConfig]) -> None:
    seen: dict[str, str] = {}
    for m in models.values():
        for n in (m.name, *m.aliases):
            if n in seen and seen[n] != m.name:
                raise ConfigError(f"models.{m.name}.aliases", f"{n!r} is already used by {seen[n]!r}")
            seen[n] = m.name


_ENV_OVERRIDES = {
    "ROUTERD_MODELS_DIR": "models_dir",
    "ROUTERD_STATE_DIR": "state_dir",
    "ROUTERD_KEEP_ALIVE": "keep_alive",
    "ROUTERD_MAX_QUEUE": "max_queue",
    "ROUTERD_LOG_LEVEL": "log_level",
}


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    file = str(path) if path else None
    data: dict[str, Any] = {}
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("<file>", f"cannot read: {e.strerror}", file) from None
        except UnicodeDecodeError as e:
            raise ConfigError("<file>", f"not UTF-8 text (byte {e.start}: "
                              f"{e.object[e.start:e.start + 1]!r})", file) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("<yaml>", f"not valid YAML: {e}", file) from None
        if not isinstance(data, dict):
            raise ConfigError("<root>", "expected a mapping at the top level", file)
    for var, key in _ENV_OVERRIDES.items():
        if var in env:
            raw = env[var]
            data[key] = int(raw) if key == "max_queue" and raw.isdigit() else raw
    return parse_config(data, file)
