"""The process's file-descriptor limit and the socket caps that must fit in it.

Owns ``fit_descriptor_limit``, run by ``serve`` before anything listens: it raises the soft
``RLIMIT_NOFILE`` as far as the hard limit allows, then lowers ``limits.max_connections`` so that every
socket the connection guard may accept (``max_connections + http_socket_reserve``) plus
``limits.fd_reserve`` descriptors for the rest (listener, Redis, logs, files) fit, with one warning
line saying so. Without it the process runs out of descriptors before its caps: ``accept()`` fails
with EMFILE and the listener stops for a second at a time, for ``/health`` and enrollment too.
A limit too small to hold the reserves stops the start (``ConfigError``).
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from lingua_scheduler.config import LimitsConfig
from lingua_scheduler.errors import ConfigError

log = logging.getLogger(__name__)


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one (when allowed); the (soft, hard) limits now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        want = hard
        if hard == resource.RLIM_INFINITY:
            # Linux refuses an infinite RLIMIT_NOFILE; the kernel's per-process ceiling applies
            want = _nr_open()
        if soft != resource.RLIM_INFINITY and want > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            except (ValueError, OSError):
                log.warning(
                    "could not raise the file-descriptor limit",
                    extra={"soft": soft, "hard": hard, "wanted": want},
                )
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1_048_576


@dataclass(frozen=True, slots=True)
class Lowered:
    """``max_connections`` was lowered to fit the descriptor limit: said once the start has gone on
    (after the "listening" line, so a start that fails says only why it failed)."""

    level: int
    message: str
    extra: dict[str, int]

    def log(self) -> None:
        log.log(self.level, self.message, extra=self.extra)


def fit_descriptor_limit(limits: LimitsConfig) -> Lowered | None:
    """Raise the descriptor limit, lower ``limits.max_connections`` to fit it; what was lowered."""
    soft, hard = raise_soft_limit()
    if soft == resource.RLIM_INFINITY:
        return None
    overhead = limits.http_socket_reserve + limits.fd_reserve
    fits = soft - overhead
    if fits < 1:
        raise ConfigError(
            "limits.max_connections",
            f"the file-descriptor limit ({soft}, hard {hard}) leaves no room for connections after "
            f"limits.http_socket_reserve ({limits.http_socket_reserve}) and limits.fd_reserve "
            f"({limits.fd_reserve}); raise it (ulimit -n, LimitNOFILE=) or lower the reserves",
        )
    if limits.max_connections <= fits:
        return None
    # the default (100 000) is above most systems' limits: fitting it is expected, lowering a
    # value an operator chose deserves a warning
    default = limits.max_connections == LimitsConfig().max_connections
    lowered = Lowered(
        logging.INFO if default else logging.WARNING,
        f"limits.max_connections lowered from {limits.max_connections} to {fits}: the "
        f"file-descriptor limit is {soft} (hard {hard}) and {overhead} descriptors are reserved "
        "(limits.http_socket_reserve + limits.fd_reserve); raise the limit (ulimit -n, "
        "LimitNOFILE=) to serve more",
        {"configured": limits.max_connections, "max_connections": fits, "nofile": soft},
    )
    limits.max_connections = fits
    return lowered
