"""sd_notify(3) without a dependency: one datagram to `$NOTIFY_SOCKET`.

Call `ready()` once the socket listens, `reloading()`/`ready()` around a SIGHUP reload,
`stopping()` when shutdown starts, `status(text)` for `systemctl status`. Outside systemd
(no NOTIFY_SOCKET) every call is a cheap no-op returning False. Workers should not inherit
NOTIFY_SOCKET: drop it from their environment.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace (Linux)
    if value.startswith("/"):
        return value
    return None  # vsock:... and others are not supported


def notify(message: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send `message` (e.g. "READY=1", "STATUS=loading") to the service manager.
    True when it was sent; False when not under systemd or when sending failed."""
    value = env.get("NOTIFY_SOCKET")
    if not value or not hasattr(socket, "AF_UNIX"):
        return False
    address = _address(value)
    if address is None:
        log.warning("sdnotify.unsupported_socket", socket=value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as e:
        log.warning("sdnotify.failed", socket=value, error=str(e))
        return False
    return True


def ready(env: Mapping[str, str] = os.environ) -> bool:
    return notify("READY=1", env)


def stopping(env: Mapping[str, str] = os.environ) -> bool:
    return notify("STOPPING=1", env)


def reloading(env: Mapping[str, str] = os.environ) -> bool:
    """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd (Type=notify-reload) expects;
    send `ready()` when the reload is done."""
    usec = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC on Linux, like systemd's clock
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", env)


def status(text: str, env: Mapping[str, str] = os.environ) -> bool:
    return notify("STATUS=" + text.replace("\n", " "), env)


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between the WATCHDOG=1 pings systemd expects (half its WatchdogSec), or None
    when no watchdog is set for this process."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6
