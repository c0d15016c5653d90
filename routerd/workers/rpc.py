"""llama.cpp's RPC backend, as routerd uses it: endpoints, the rpc-server binary, and the one
question routerd asks an rpc-server itself — how much memory its devices have.

The wire format is the vendored llama.cpp's (ggml/src/ggml-rpc/ggml-rpc.cpp, protocol 7):
a request is | cmd (1 byte) | size (u64) | payload |, a reply | size (u64) | payload |, little
endian. A client opens with HELLO (24 bytes of transport capabilities, all zero = plain TCP);
DEVICE_COUNT and GET_DEVICE_MEMORY {u32 device} -> {u64 free, u64 total} follow. An
rpc-server serves ONE client at a time and queues the rest: while a llama-server is connected,
a probe gets no HELLO reply and times out (`RpcBusy`).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from ..errors import RouterdError
from .backends import find_binary

PROTOCOL_MAJOR = 7
_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
_CAPS = 24  # RPC_CONN_CAPS_SIZE
DEFAULT_PORT = 50052  # rpc-server's own default
PROBE_TIMEOUT = 1.5


class RpcError(RouterdError):
    status = 503
    code = "rpc_unavailable"


class RpcBusy(RpcError):
    """The rpc-server accepted the connection but serves another client."""


@dataclass(frozen=True)
class DeviceMemory:
    free: int
    total: int


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'10.0.0.2:50052' -> ('10.0.0.2', 50052). llama.cpp splits at the first ':', so IPv6
    literals cannot be named; ValueError says why."""
    host, sep, port = endpoint.partition(":")
    if not sep or not host or ":" in port or "[" in host:
        raise ValueError(f"expected host:port (IPv4 or a host name), got {endpoint!r}")
    try:
        n = int(port)
    except ValueError:
        raise ValueError(f"port must be a number in {endpoint!r}") from None
    if not 1 <= n <= 65535:
        raise ValueError(f"port out of range in {endpoint!r}")
    return host, n


def bind_address(host: str) -> str:
    """The IPv4 literal rpc-server binds (it takes nothing else: inet_addr)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise ValueError(f"rpc-server binds an IPv4 address, got {host!r}") from None


def is_wildcard(host: str) -> bool:
    return bind_address(host) == "0.0.0.0"


def find_rpc_server(setting: str = "auto") -> str | None:
    """A path, or auto = `rpc-server` on PATH, then the one `make install` built beside
    routerd (.venv/bin/rpc-server)."""
    return find_binary("rpc-server", setting)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def _call(sock: socket.socket, cmd: int, payload: bytes, reply: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != reply:
        raise RpcError(f"unexpected reply size {size} to command {cmd} (wanted {reply})")
    return _recv_exact(sock, size)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> tuple[DeviceMemory, ...]:
    """Each device's (free, total) memory as the rpc-server at `endpoint` reports it."""
    host, port = split_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise RpcError(f"rpc-server {endpoint} unreachable: {e}") from None
    with sock:
        sock.settimeout(timeout)
        try:
            hello = _call(sock, _CMD_HELLO, bytes(_CAPS), 4 + _CAPS)
        except socket.timeout:
            raise RpcBusy(f"rpc-server {endpoint} did not answer (serving another client?)") \
                from None
        except (OSError, struct.error) as e:
            raise RpcError(f"rpc-server {endpoint}: {e}") from None
        if hello[0] != PROTOCOL_MAJOR:
            raise RpcError(f"rpc-server {endpoint} speaks RPC protocol "
                           f"{hello[0]}.{hello[1]}.{hello[2]}; routerd knows {PROTOCOL_MAJOR}")
        try:
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            out = []
            for dev in range(count):
                free, total = struct.unpack(
                    "<QQ", _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", dev), 16))
                out.append(DeviceMemory(free, total))
        except (OSError, struct.error) as e:
            raise RpcError(f"rpc-server {endpoint}: {e}") from None
    return tuple(out)
