"""TLS for the listener: the server ``ssl.SSLContext`` built from ``[tls]`` (``serve --tls-cert/--tls-key``).

Owns only the construction of the context: TLS 1.2 at least, the certificate chain and key loaded at
start, so a wrong path or a key that does not match the certificate stops the start with a
``ConfigError`` naming the key and the path instead of failing on the first handshake. Client
certificates are not requested: nodes and sessions authenticate with their tokens and API keys
(docs/security.md).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from lingua_scheduler.config import TlsConfig
from lingua_scheduler.errors import ConfigError


def server_ssl_context(cfg: TlsConfig) -> ssl.SSLContext | None:
    """The context to serve with, or None when no certificate is configured (plain ws:// and http://)."""
    if not cfg.cert_file:
        return None
    for key, path in (("tls.cert_file", cfg.cert_file), ("tls.key_file", cfg.key_file)):
        _readable(key, path)
    # Purpose.CLIENT_AUTH = the server side; the defaults exclude SSLv3, TLS 1.0/1.1 and weak ciphers
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (ssl.SSLError, OSError):
        raise ConfigError(
            "tls.cert_file",
            f"cannot load the certificate {cfg.cert_file} with the key {cfg.key_file}: they must be a "
            "PEM certificate (chain) and its unencrypted PEM private key",
        ) from None
    return ctx


def _readable(key: str, path: str) -> None:
    """A missing or unreadable file is named here: the ssl module's own error does not say which."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, f"file not found: {path}")
    if not p.is_file():
        raise ConfigError(key, f"not a file: {path}")
    try:
        with p.open("rb"):
            pass
    except OSError:
        raise ConfigError(key, f"cannot read {path} (check its permissions)") from None
