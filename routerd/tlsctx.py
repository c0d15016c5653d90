"""Optional TLS for the listening socket, from `tls.cert_file` and `tls.key_file`."""

from __future__ import annotations

import ssl

from .config import Config, ConfigError


def _check_readable(key: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}", None) from None


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """A server-side SSLContext (TLS 1.2+), or None when TLS is not configured.
    Unreadable or mismatched files raise ConfigError naming the key."""
    tls = config.tls
    if not tls.cert_file and not tls.key_file:
        return None
    if not tls.cert_file or not tls.key_file:
        raise ConfigError("tls", "set both cert_file and key_file, or neither", config.source)
    cert, key = str(config.expand(tls.cert_file)), str(config.expand(tls.key_file))
    _check_readable("tls.cert_file", cert)
    _check_readable("tls.key_file", key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        reason = e.reason or str(e)
        raise ConfigError("tls", f"cannot load certificate {cert} with key {key}: {reason}",
                          config.source) from None
    return ctx
