"""The LAN-facing guards: API keys, Host (DNS rebinding), CORS, body cap, upstream paths.

Wiring (the app factory does this)::

    keyring = keyring_from_config(config)
    app = web.Application(
        middlewares=[error_middleware, *security_middlewares(config, keyring)],
        client_max_size=client_max_size(config),
    )
    app.on_response_prepare.append(cors_response_hook(config))  # streams, error bodies too
    warn_if_exposed(config, keyring, log)

Every rejection raises a `routerd.errors` exception; the outer error middleware renders it in
the route's dialect. Decisions worth knowing:

- Open without a key: `GET|HEAD /` and `GET|HEAD /health` with no query string (liveness
  probes that reveal nothing; `/health?model=x` could start a load, so it needs a key).
  `/api/version`, `/v1/models`, `/metrics` need a key: they reveal what runs here.
- `exempt_loopback` admits loopback peers that send *no* `Authorization` header; a loopback
  client that does send one is checked like anyone (a wrong key is a 401, a right one applies
  its model limits). Behind a reverse proxy on the same host every peer is loopback: set
  `auth.exempt_loopback: false` there.
- Host: bound to loopback, only localhost, `*.localhost`, loopback IPs, this machine's hostname
  and `allowed_hosts` pass. Bound elsewhere, any Host passes unless `allowed_hosts` is set; then
  those, the local names and IP literals pass (an IP-literal Host cannot be a rebinding attack).
  A request without a Host header, or an empty one (not what a browser sends), passes.
- CORS: `Origin: null` (sandboxed iframes, file:// pages) is refused unless "null" is listed;
  `*` in a pattern matches within the host part, and a trailing `:*` matches a numeric port.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import ipaddress
import math
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..config import Config, ConfigError
from ..errors import BadRequest, Forbidden, PayloadTooLarge, TooManyRequests, Unauthorized
from .common import DIALECTS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request_key(name: str) -> Any:
    """A typed request key where aiohttp has them (3.14+), else the plain string."""
    key_type = getattr(web, "RequestKey", None)
    return key_type(name, object) if key_type is not None else name


API_KEY = _request_key("api_key")  # request[API_KEY]: the matched KeyEntry, or None
PUBLIC_PATHS = frozenset({"/", "/health"})
# The dashboard's page and static files (the same public code for everyone; its data comes
# from the API, which needs a key), known by the route that matched, not by the raw path.
PUBLIC_ROUTES = frozenset({"/ui", "/ui/", "/ui/static/{path}"})
CORS_METHODS = "GET, POST, PUT, DELETE, HEAD, OPTIONS"
CORS_HEADERS = ("Authorization", "Content-Type", "Accept", "X-Requested-With")
CORS_MAX_AGE = "600"

# ---------------------------------------------------------------- API keys

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_PLAIN_KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a header can carry unchanged
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]*")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _model_forms(name: str) -> tuple[str, ...]:
    """A name and its `:latest`-normalised twin (Ollama treats them as one)."""
    if name.endswith(":latest"):
        return (name, name[: -len(":latest")])
    return (name, f"{name}:latest") if ":" not in name.rsplit("/", 1)[-1] else (name,)


ROLES = ("admin", "user")


@dataclass(frozen=True)
class KeyEntry:
    """One configured key, kept only as its SHA-256 digest, with its role and limits.

    `admin` may do everything (the role of a line without `role=`, as every key could before
    roles existed); `user` runs inference on its models and lists, shows and ps's them, and
    may pin a model (`keep_alive: -1`) or change load options (`num_ctx`, `num_gpu`) only
    with `pin=yes` / `load_options=yes`."""

    digest: bytes
    models: frozenset[str] | None  # None: any model
    label: str  # "<file>:<line>", safe to log
    role: str = "admin"
    rpm: int | None = None  # requests per minute
    streams: int | None = None  # concurrent inference requests
    pin: bool = True
    load_options: bool = True
    name: str = ""  # the metrics label; never the key

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def allows(self, model: str) -> bool:
        if self.models is None:
            return True
        return any(form in self.models for form in _model_forms(model))


@dataclass(frozen=True)
class KeyRing:
    entries: tuple[KeyEntry, ...]
    source: str | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def check(self, token: str) -> KeyEntry | None:
        """The entry whose key is `token`, or None. Compares the token's digest with every
        entry's digest in constant time and never stops early."""
        digest = _digest(token)
        found: KeyEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found


_KEY_OPTIONS = ("role", "models", "rpm", "streams", "pin", "load_options", "name")
_YES_NO = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


def _parse_key_line(text: str) -> tuple[bytes, dict[str, Any]]:
    """`KEY [role=admin|user] [models=a,b] [rpm=N] [streams=N] [pin=yes|no]
    [load_options=yes|no] [name=LABEL]` → the key's digest and its KeyEntry fields."""
    fields = text.split()
    secret, options = fields[0], fields[1:]
    if secret.lower().startswith("sha256:"):
        hexdigest = secret[len("sha256:"):]
        if not _HEX64.fullmatch(hexdigest):
            raise ValueError("sha256: must be followed by 64 hex digits")
        digest = bytes.fromhex(hexdigest)
    elif _PLAIN_KEY.fullmatch(secret) and not secret.split("=", 1)[0] in _KEY_OPTIONS:
        digest = _digest(secret)
    else:
        raise ValueError("a key must be visible ASCII without spaces")
    out: dict[str, Any] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if name not in _KEY_OPTIONS or not sep:
            raise ValueError(f"unexpected {option!r} (after the key: "
                             + ", ".join(f"{o}=..." for o in _KEY_OPTIONS) + ")")
        if name in out:
            raise ValueError(f"unexpected {option!r}: {name}= is given twice")
        if name == "models":
            names = value.split(",")
            if not all(_MODEL_NAME.fullmatch(n) for n in names):
                raise ValueError(f"invalid model list {value!r}")
            out["models"] = frozenset(f for n in names for f in _model_forms(n))
        elif not value:
            raise ValueError(f"{name}= needs a value")
        elif name == "role":
            if value not in ROLES:
                raise ValueError(f"role must be {' or '.join(ROLES)}, not {value!r}")
            out["role"] = value
        elif name in ("rpm", "streams"):
            if not value.isdigit() or not 0 < int(value) <= 1_000_000:
                raise ValueError(f"{name} must be a whole number from 1 to 1000000")
            out[name] = int(value)
        elif name in ("pin", "load_options"):
            if value.lower() not in _YES_NO:
                raise ValueError(f"{name} must be yes or no")
            out[name] = _YES_NO[value.lower()]
        else:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
                raise ValueError("name must be 1-64 letters, digits, '.', '_' or '-'")
            out["name"] = value
    if out.get("role") == "user":  # what a user key may do beyond inference: only as given
        out.setdefault("pin", False)
        out.setdefault("load_options", False)
    return digest, out


def load_api_keys(path: str | Path) -> KeyRing:
    """Read a keys file: one key per line, plain or `sha256:<hex>` (the hex SHA-256 of the
    key, e.g. `printf %s KEY | sha256sum`), optionally followed by `role=`, `models=a,b`,
    `rpm=`, `streams=`, `pin=`, `load_options=`, `name=`. `#` starts a comment. A bad line
    raises ConfigError naming the file and the line."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError("auth.api_keys_file", f"cannot read {file}: {reason}") from None
    entries: list[KeyEntry] = []
    seen: dict[bytes, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        try:
            digest, fields = _parse_key_line(line)
        except ValueError as e:
            raise ConfigError(f"line {lineno}", str(e), file) from None
        if digest in seen:
            raise ConfigError(f"line {lineno}", f"same key as line {seen[digest]}", file)
        seen[digest] = lineno
        fields.setdefault("name", f"line{lineno}")
        entries.append(KeyEntry(digest, fields.pop("models", None), f"{file}:{lineno}",
                                **fields))
    return KeyRing(tuple(entries), file)


def keyring_from_config(config: Config) -> KeyRing | None:
    """The configured keys, or None when `auth.api_keys_file` is unset (auth off)."""
    if not config.auth.api_keys_file:
        return None
    return load_api_keys(config.expand(config.auth.api_keys_file))


def check_model_allowed(request: web.Request, model: str, *aliases: str) -> None:
    """Raise Forbidden when the request's key may not use `model` (any of its names)."""
    entry: KeyEntry | None = request.get(API_KEY)
    if entry is None or any(entry.allows(n) for n in (model, *aliases)):
        return
    raise Forbidden(f"this API key may not use model {model!r}")


def model_visible(request: web.Request, model: str) -> bool:
    """Whether lists (/api/tags, /api/ps, /v1/models) show `model` to the request's key."""
    entry: KeyEntry | None = request.get(API_KEY)
    return entry is None or entry.allows(model)


def check_permission(request: web.Request, what: str) -> None:
    """`pin` (keep_alive -1), `unload` (keep_alive 0) or `load_options` (num_ctx, num_gpu):
    Forbidden unless the request's key may. No key (auth off, loopback) may do all."""
    entry: KeyEntry | None = request.get(API_KEY)
    if entry is None or entry.is_admin:
        return
    if what == "pin" and entry.pin or what == "load_options" and entry.load_options:
        return
    hint = {"pin": "pin models (keep_alive -1; the key needs pin=yes)",
            "unload": "unload models (keep_alive 0; an admin key can)",
            "load_options": "change load options such as num_ctx or num_gpu "
                            "(the key needs load_options=yes)"}[what]
    raise Forbidden(f"this API key may not {hint}")


# ---------------------------------------------------------------- addresses and hosts


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback_host(host: str) -> bool:
    """Whether a bind address or Host name means this machine only."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    addr = _ip(name)
    return addr is not None and addr.is_loopback


def host_name(header: str) -> str:
    """The host part of a Host header: lowercased, port and IPv6 brackets removed."""
    h = header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if p.startswith("*.") and (name.endswith(p[1:]) or name == p[2:]):
            return True
        if name == p:
            return True
    return False


def _host_checker(config: Config) -> Callable[[str | None], bool] | None:
    """Which Host headers pass (None: any)."""
    allowed = tuple(host_name(h) for h in config.allowed_hosts)
    bound_loopback = is_loopback_host(config.host)
    if not bound_loopback and not allowed:
        return None
    hostname = socket.gethostname().lower().rstrip(".")
    local_names = {hostname, hostname.split(".", 1)[0]}

    @functools.lru_cache(maxsize=256)  # clients send the same few Host values
    def allowed_host(header: str | None) -> bool:
        if not header:
            return True
        name = host_name(header)
        if is_loopback_host(name) or name in local_names or _matches_any(name, allowed):
            return True
        return not bound_loopback and _ip(name) is not None

    return allowed_host


def _make_host_check(guard: Guard) -> Middleware:
    @web.middleware
    async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        allowed_host = guard.allowed_host
        if allowed_host is not None and not allowed_host(request.headers.get("Host")):
            raise Forbidden("Host not allowed (add it to allowed_hosts to reach routerd by it)")
        return await handler(request)

    return host_check


# ---------------------------------------------------------------- CORS


def origin_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a `cors_origins` entry: `*` alone matches any origin; a trailing `:*` matches
    a numeric port; any other `*` matches within the host part (no `/`, `@`, `?`, `#`)."""
    p = pattern.strip().lower()
    if p == "*":
        return re.compile(r".*", re.DOTALL)
    pieces = p.split("*")
    out: list[str] = []
    for i, piece in enumerate(pieces):
        out.append(re.escape(piece))
        if i < len(pieces) - 1:
            is_port = piece.endswith(":") and i == len(pieces) - 2 and pieces[-1] == ""
            out.append(r"\d{1,5}" if is_port else r"[^/\s@?#]*")
    return re.compile("".join(out))


def _merge_vary(response: web.StreamResponse, value: str) -> None:
    current = response.headers.get("Vary")
    if not current:
        response.headers["Vary"] = value
    elif value.lower() not in {v.strip().lower() for v in current.split(",")}:
        response.headers["Vary"] = f"{current}, {value}"


def _preflight(request: web.Request, origin: str) -> web.Response:
    wanted = request.headers.get("Access-Control-Request-Headers", "")
    names = list(CORS_HEADERS)
    lower = {n.lower() for n in names}
    for h in (x.strip() for x in wanted.split(",")):
        if h and h.lower() not in lower and re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", h):
            names.append(h)
            lower.add(h.lower())
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": ", ".join(names),
        "Access-Control-Max-Age": CORS_MAX_AGE,
        "Vary": "Origin",
    }
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return web.Response(status=204, headers=headers)


class _Origins:
    def __init__(self, config: Config) -> None:
        self.patterns = tuple(origin_pattern(p) for p in config.cors_origins)

    def allowed(self, origin: str) -> bool:
        lowered = origin.lower()
        return any(p.fullmatch(lowered) for p in self.patterns)


def _make_cors(guard: Guard) -> Middleware:
    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if not guard.origins.allowed(origin):
            raise Forbidden(f"Origin {origin!r} not allowed (see cors_origins)")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return _preflight(request, origin)
        return await handler(request)

    return cors


def cors_response_hook(config: Config | Guard) -> Callable[[web.Request, web.StreamResponse],
                                                           Awaitable[None]]:
    """An `on_response_prepare` hook echoing an allowed Origin on every response, streams
    and error bodies included (a middleware cannot: streams send their headers inside the
    handler, errors are rendered outside it). Decides from the request's headers alone."""
    guard = config if isinstance(config, Guard) else Guard(config, None)

    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and guard.origins.allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            _merge_vary(response, "Origin")

    return add_cors_headers


# ---------------------------------------------------------------- auth and body cap


def _is_public(request: web.Request, guard: Guard | None = None) -> bool:
    if request.method not in ("GET", "HEAD") or request.query_string:
        return False
    return request.path in PUBLIC_PATHS or _public_route(request) or (
        guard is not None and guard.metrics_public and request.path == "/metrics")


def _public_route(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical in PUBLIC_ROUTES


def _is_loopback_peer(remote: str | None) -> bool:
    addr = _ip(remote) if remote else None
    return addr is not None and addr.is_loopback


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _make_auth(guard: Guard) -> Middleware:
    challenge = {"WWW-Authenticate": 'Bearer realm="routerd"'}

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[API_KEY] = None
        keyring = guard.keyring
        if keyring is None:
            return await handler(request)
        header = request.headers.get("Authorization") or _x_api_key(request)
        if header is None and (_is_public(request, guard)
                               or guard.exempt_loopback and _is_loopback_peer(request.remote)):
            return await handler(request)
        token = _bearer(header)
        entry = keyring.check(token) if token is not None else None
        if entry is None:
            if _is_public(request, guard):
                return await handler(request)
            what = "invalid API key" if token else "missing API key (Authorization: Bearer <key>)"
            raise Unauthorized(what, headers=challenge)
        request[API_KEY] = entry
        table = request.app.get(DIALECTS)
        if not entry.is_admin and (table is not None and table.admin_only(request)
                                   or request.path == "/metrics"):
            guard.count(entry, "forbidden")
            raise Forbidden(f"this API key (role {entry.role}) may not use "
                            f"{request.method} {request.path}: it needs an admin key")
        inference = table is not None and table.is_inference(request)
        guard.admit(entry, inference=inference)
        try:
            return await handler(request)
        finally:
            guard.done(entry, inference=inference)

    return auth


def _x_api_key(request: web.Request) -> str | None:
    """Anthropic's `x-api-key` header, read as a bearer token."""
    key = request.headers.get("x-api-key")
    return f"Bearer {key}" if key else None


class Guard:
    """The live security policy, built from the config and rebuilt on SIGHUP (`reload`):
    the keys file, Host and CORS checks, the body cap. Per-key request windows and
    in-flight counts belong to the key, not the file: they survive a reload."""

    def __init__(self, config: Config, keyring: KeyRing | None | bool = True) -> None:
        self.metrics: Any = None  # set by the app: per-key counters
        self._windows: dict[bytes, collections.deque[float]] = {}
        self._inflight: dict[bytes, int] = {}
        self.install(config, keyring_from_config(config) if keyring is True
                     else keyring if isinstance(keyring, KeyRing) else None)

    def install(self, config: Config, keyring: KeyRing | None) -> None:
        self.config, self.keyring = config, keyring
        self.allowed_host = _host_checker(config)
        self.origins = _Origins(config)
        self.max_body = config.max_body
        self.exempt_loopback = config.auth.exempt_loopback
        self.metrics_public = config.auth.metrics_public

    def reload(self, config: Config) -> None:
        """Install what `config` says; a keys file that does not load raises ConfigError
        and changes nothing."""
        self.install(config, keyring_from_config(config))

    def count(self, entry: KeyEntry, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count_key(entry.name, outcome)

    def admit(self, entry: KeyEntry, *, inference: bool) -> None:
        """Per-key limits: requests per minute (any route) and concurrent inference
        requests. Over either: 429 with Retry-After."""
        if entry.rpm is not None:
            now = time.monotonic()
            window = self._windows.get(entry.digest)
            if window is None or window.maxlen != entry.rpm:
                window = self._windows[entry.digest] = collections.deque(
                    window or (), maxlen=entry.rpm)
            if len(window) == entry.rpm and now - window[0] < 60:
                self.count(entry, "rate_limited")
                retry = max(1, math.ceil(60 - (now - window[0])))
                raise TooManyRequests(f"this API key may send {entry.rpm} requests per "
                                      "minute; retry later", retry_after=retry)
            window.append(now)
        if inference and entry.streams is not None:
            if self._inflight.get(entry.digest, 0) >= entry.streams:
                self.count(entry, "rate_limited")
                raise TooManyRequests(f"this API key may run {entry.streams} requests at "
                                      "once; retry when one ends", retry_after=1)
        if inference:
            self._inflight[entry.digest] = self._inflight.get(entry.digest, 0) + 1
        self.count(entry, "admitted")

    def done(self, entry: KeyEntry, *, inference: bool) -> None:
        if inference:
            left = self._inflight.get(entry.digest, 1) - 1
            if left:
                self._inflight[entry.digest] = left
            else:
                self._inflight.pop(entry.digest, None)


def client_max_size(config: Config) -> int:
    """What to pass as `web.Application(client_max_size=...)`: caps bodies read with
    `request.read()/json()/post()`, chunked ones included. Handlers that stream
    `request.content` themselves (blob uploads) are not capped by it."""
    return config.max_body


def _is_blob_upload(request: web.Request) -> bool:
    """POST to the route `/api/blobs/{digest}` (the routing decision, not the raw path)."""
    if request.method != "POST":
        return False
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical.startswith("/api/blobs/")


def _make_body_cap(guard: Guard) -> Middleware:
    @web.middleware
    async def body_cap(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_blob_upload(request):
            return await handler(request)
        limit = guard.max_body
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(limit)
        if request.client_max_size != limit:  # max_body changed on a reload
            request = request.clone(client_max_size=limit)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit) from None

    return body_cap


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body larger than max_body ({limit} bytes)")


def security_middlewares(config: Config | Guard,
                         keyring: KeyRing | None = None) -> list[Middleware]:
    """Host check, CORS, auth, body cap, in that order, all reading the live Guard (one is
    made from `config` and `keyring` when a Config is given)."""
    guard = config if isinstance(config, Guard) else Guard(config, keyring)
    return [_make_host_check(guard), _make_cors(guard), _make_auth(guard),
            _make_body_cap(guard)]


def warn_if_exposed(config: Config, keyring: KeyRing | None, log: Any) -> bool:
    """Log a warning (and return True) when bound beyond loopback with no API keys. An
    empty keys file is not exposure (every remote request gets a 401) but is warned about."""
    if is_loopback_host(config.host):
        return False
    if keyring is not None:
        if not keyring:
            log.warning("security.keys_file_empty", file=keyring.source,
                        hint="every request from another machine will get 401")
        return False
    log.warning("security.exposed_without_keys", host=config.host, port=config.port,
                hint="anyone who can reach this address can use and pull models; "
                     "set auth.api_keys_file")
    return True


# ---------------------------------------------------------------- /upstream paths

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def upstream_path(raw: str) -> str:
    """Normalise the `<path>` of `/upstream/<model>/<path>` into a percent-encoded path that
    starts with `/` and stays inside the worker's root. Rejects (BadRequest) `..` segments
    (also percent- or doubly-encoded), backslashes, NUL and control characters, absolute
    URLs and `//host` forms. `raw` is what follows `/upstream/<model>/`; a single leading
    `/` (from `/upstream/m//x`) is tolerated since the result is always one path rooted at
    `/`, never a host. Pass the query string on separately."""
    text = raw
    for _ in range(4):  # decode until stable, so %252e%252e cannot sneak through
        try:
            decoded = unquote(text, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("upstream path is not valid UTF-8 once decoded") from None
        if decoded == text:
            break
        text = decoded
    else:
        raise BadRequest("upstream path is encoded too many times")
    if any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise BadRequest("upstream path contains a backslash or a control character")
    if "://" in text or _SCHEME.match(text.lstrip("/")) or text.startswith("//"):
        raise BadRequest("upstream path must be a path, not a URL")
    segments = [s for s in text.split("/") if s not in ("", ".")]
    if any(s.split(";", 1)[0] == ".." for s in segments):
        raise BadRequest("upstream path must not contain '..'")
    return "/" + quote("/".join(segments), safe=_PATH_SAFE)


GUARD = web.AppKey("guard", Guard)
