"""Reload on SIGHUP: the ``[auth]`` section and the TLS certificate of a running ``serve``, no restart.

Owns ``Reloader``. On SIGHUP it builds the configuration again the way the start did (the same
``--config`` file, the environment and the command-line flags) and then:

- refuses the whole reload, logged at ERROR with the key and the reason, when the file is not valid
  or the new certificate and key do not load: the running configuration stays as it was;
- otherwise loads the certificate chain into the live ``SSLContext`` (``load_cert_chain``: the
  listening sockets keep their context, new handshakes get the new certificate, established
  connections keep theirs) and gives ``AuthService`` the new ``[auth]`` section (new keys work for new
  sessions at once, removed keys are refused for new sessions, added revocations apply to new
  registrations); what changed is logged at INFO: tenants and key counts, whether node secrets
  changed, revocations added, the certificate's SHA-256 fingerprint before and after. Never a secret
  or a key hash.

Sections other than ``[auth]`` and ``[tls]`` are not applied: a difference there is logged as needing a
restart. TLS cannot be switched on or off by a reload (the listener was built with or without it).

Must never: drop the running configuration for a bad file, or log a secret.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec
from prometheus_client.core import CounterMetricFamily, Metric

from lingua_scheduler.config import AuthConfig, Config, TlsConfig
from lingua_scheduler.errors import ConfigError
from lingua_scheduler.server.state import SchedulerState
from lingua_scheduler.server.tls import server_ssl_context

log = logging.getLogger(__name__)

#: sections a reload applies; a change anywhere else waits for a restart
RELOADED = ("auth", "tls")


def certificate_fingerprint(cert_file: str) -> str | None:
    """SHA-256 (hex) of the first certificate of a PEM file: what a client sees as the peer's."""
    try:
        pem = Path(cert_file).read_text(encoding="ascii", errors="replace")
        begin = pem.index("-----BEGIN CERTIFICATE-----")
        end = pem.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem[begin:end])).hexdigest()
    except (OSError, ValueError):
        return None


def auth_changes(old: AuthConfig, new: AuthConfig) -> dict[str, object]:
    """What differs between two ``[auth]`` sections, in words safe for a log line (no secret, no hash)."""
    out: dict[str, object] = {}
    old_keys: dict[str, set[str]] = {}
    new_keys: dict[str, set[str]] = {}
    for tenants, into in ((old.tenants, old_keys), (new.tenants, new_keys)):
        for t in tenants:
            into.setdefault(t.tenant_id, set()).add(t.key_sha256)
    if added := sorted(set(new_keys) - set(old_keys)):
        out["tenants_added"] = added
    if removed := sorted(set(old_keys) - set(new_keys)):
        out["tenants_removed"] = removed
    rekeyed = {
        t: {"keys_added": len(new_keys[t] - old_keys[t]), "keys_removed": len(old_keys[t] - new_keys[t])}
        for t in sorted(set(old_keys) & set(new_keys))
        if old_keys[t] != new_keys[t]
    }
    if rekeyed:
        out["tenant_keys_changed"] = rekeyed
    old_limits = {t.tenant_id: (t.max_sessions, t.max_jobs_per_second, t.jobs_burst) for t in old.tenants}
    limits = sorted(
        t.tenant_id
        for t in new.tenants
        if t.tenant_id in old_limits
        and old_limits[t.tenant_id] != (t.max_sessions, t.max_jobs_per_second, t.jobs_burst)
    )
    if limits:
        out["tenant_limits_changed"] = sorted(set(limits))
    for name in ("node_enrollment_secret", "node_token_secret", "node_token_previous_secrets"):
        if getattr(old, name) != getattr(new, name):
            out[f"{name}_changed"] = True
    if revoked := sorted(set(new.revoked_node_ids) - set(old.revoked_node_ids)):
        out["revoked_added"] = revoked
    if unrevoked := sorted(set(old.revoked_node_ids) - set(new.revoked_node_ids)):
        out["revocations_kept"] = unrevoked  # a revocation is never undone (ids are not reused)
    for name in ("insecure_dev", "api_key_query_param"):
        if getattr(old, name) != getattr(new, name):
            out[name] = getattr(new, name)
    return out


def _sections_changed(old: Config, new: Config) -> list[str]:
    old_d, new_d = msgspec.to_builtins(old), msgspec.to_builtins(new)
    return sorted(k for k in new_d if k not in RELOADED and old_d.get(k) != new_d[k])


class Reloader:
    """Applies a new configuration's ``[auth]`` and ``[tls]`` to a running instance (see the module)."""

    def __init__(
        self, state: SchedulerState, load: Callable[[], Config], ssl_context: ssl.SSLContext | None
    ) -> None:
        self.state = state
        self.load = load
        self.ssl_context = ssl_context
        self.results: dict[str, int] = {"ok": 0, "refused": 0}
        #: told the configuration after each applied reload (the integrator API's tenants, quotas and
        #: webhook endpoints come from ``[auth]``)
        self.after: list[Callable[[Config], None]] = []
        self.fingerprint = certificate_fingerprint(state.config.tls.cert_file) if ssl_context else None
        state.metrics.add_live(self.metrics)

    def reload(self) -> bool:
        """One reload (the SIGHUP handler); True when applied."""
        old = self.state.config
        try:
            new = self.load()
            tls_change = self._check_tls(old.tls, new.tls)
        except ConfigError as exc:
            self.results["refused"] += 1
            log.error(
                "configuration reload refused: the running configuration is kept",
                extra={"key": exc.key, "reason": str(exc)},
            )
            return False
        changes: dict[str, object] = {"auth": auth_changes(old.auth, new.auth)}
        if tls_change is not None:
            assert self.ssl_context is not None
            self.ssl_context.load_cert_chain(new.tls.cert_file, new.tls.key_file)
            changes["tls"] = tls_change
            self.fingerprint = str(tls_change["fingerprint"])
            old.tls = new.tls
        self.state.auth.reload(new.auth)
        old.auth = new.auth
        for listener in self.after:
            listener(old)
        self.results["ok"] += 1
        log.info("configuration reloaded", extra={"changes": changes})
        if needs_restart := _sections_changed(old, new):
            log.warning(
                "configuration changes that need a restart were not applied",
                extra={"sections": needs_restart},
            )
        for plane in self.state.auth.open_planes():
            log.warning(
                "after the reload, AUTHENTICATION DISABLED for %s", plane, extra={"security": "insecure"}
            )
        return True

    def _check_tls(self, old: TlsConfig, new: TlsConfig) -> dict[str, object] | None:
        """Validate the new certificate in a context of its own (raises ``ConfigError``); what a reload
        would change, or None when TLS stays off (or cannot be switched by a reload)."""
        if self.ssl_context is None:
            if new.cert_file:
                log.warning(
                    "TLS was off at start: serving TLS needs a restart", extra={"cert_file": new.cert_file}
                )
            return None
        if not new.cert_file:
            log.warning("tls.cert_file is empty now: TLS stays on until a restart")
            return None
        server_ssl_context(new)  # a bad file, path or key is refused here, before the live context
        fingerprint = certificate_fingerprint(new.cert_file)
        return {
            "cert_file": new.cert_file,
            "fingerprint": fingerprint,
            "previous_fingerprint": self.fingerprint,
            "changed": fingerprint != self.fingerprint or old.cert_file != new.cert_file,
        }

    def metrics(self) -> Iterable[Metric]:
        reloads = CounterMetricFamily(
            "lingua_config_reloads", "Configuration reloads (SIGHUP), by result", labels=["result"]
        )
        for result, n in self.results.items():
            reloads.add_metric([result], n)
        yield reloads


__all__ = ["Reloader", "auth_changes", "certificate_fingerprint"]
