"""Credentials and per-tenant limits: node tokens, tenant API keys, token buckets. Pure and synchronous.

Owns the cryptographic and bookkeeping decisions of authentication, so that they can be tested
without sockets and used identically by every scheduler instance:

- **Node tokens**: ``token = "v1." + base64url(HMAC-SHA256(signing_key, "lingua-node-token/v1:" + id))``.
  A token is bound to one node id and verifiable by any instance that holds the signing key: no
  lookup, no shared table of issued tokens. Several keys may verify (the current one and previous
  ones during a rotation); tokens are always issued with the current key.
- **Registration decision** (``NodeAuthenticator.check``): a node without an id must present the fleet
  enrollment secret and is given a fresh id by the registry; a node with an id must present that id's
  token. There is no third way: the enrollment secret never lets a node choose its id, so knowing it
  does not let anybody take over an existing node's identity.
- **Tenant API keys** (``TenantKeys``): only SHA-256 hashes are configured; a presented key is hashed
  and compared with every configured hash by ``hmac.compare_digest`` (time independent of where the
  hashes differ and of which tenant matched).
- **Limits** (``TenantLimits``): concurrent sessions and a token bucket of jobs per tenant (the
  bucket is ``core.rate_limit.TokenBucket``, shared with the per-connection message rate).

Must never: do I/O, read the time itself (the ``Clock`` is injected), log, or keep a plaintext API key.
Secrets are compared only in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from lingua_scheduler.clock import Clock
from lingua_scheduler.core.rate_limit import TokenBucket
from lingua_scheduler.errors import AuthenticationError

TOKEN_VERSION = "v1"
#: domain separation: an HMAC computed for anything else with the same key is never a valid token
_TOKEN_CONTEXT = b"lingua-node-token/v1:"
_KEY_DERIVATION_CONTEXT = b"lingua-scheduler node-token signing key v1"


# --- node tokens -------------------------------------------------------------------------------------


def derive_signing_key(secret: str) -> bytes:
    """The HMAC key for node tokens from a configured secret (the enrollment secret, when no separate
    signing secret is configured). Derived rather than used as is, so that the same string never
    serves as both a password that nodes present and a MAC key."""
    return hmac.new(secret.encode(), _KEY_DERIVATION_CONTEXT, hashlib.sha256).digest()


def issue_node_token(key: bytes, node_id: str) -> str:
    mac = hmac.new(key, _TOKEN_CONTEXT + node_id.encode(), hashlib.sha256).digest()
    return f"{TOKEN_VERSION}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def verify_node_token(keys: Sequence[bytes], node_id: str, token: str) -> bool:
    """True when ``token`` is the token of ``node_id`` under one of ``keys``. Every key is tried (no
    early exit), so the time taken does not tell which key matched."""
    ok = False
    given = token.encode()
    for key in keys:
        ok |= hmac.compare_digest(given, issue_node_token(key, node_id).encode())
    return ok


def _secret_matches(given: str, expected: str) -> bool:
    # compare digests of equal length: compare_digest on the raw strings leaks their length
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


@dataclass(frozen=True, slots=True)
class NodeAdmission:
    """Outcome of a successful credential check."""

    #: "enrolled" (new node, fresh id) or "token" (known node id, valid token)
    how: str


class NodeAuthenticator:
    """Decides whether a ``node_register`` may proceed, and issues tokens.

    ``enrollment_secret`` lets a new node in; ``keys[0]`` signs tokens, every key in ``keys`` verifies
    them; ``is_revoked(node_id)`` is the shared revocation list (a local copy kept by the shell).
    """

    def __init__(
        self, enrollment_secret: str, keys: Sequence[bytes], is_revoked: Callable[[str], bool]
    ) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        self.enrollment_secret = enrollment_secret
        self.keys = tuple(keys)
        self.is_revoked = is_revoked

    def issue(self, node_id: str) -> str:
        return issue_node_token(self.keys[0], node_id)

    def check(
        self, node_id: str | None, enrollment_secret: str | None, node_token: str | None
    ) -> NodeAdmission:
        """Raise ``AuthenticationError`` (UNAUTHORIZED) with a message saying what is missing or wrong."""
        if node_id is None:
            if not enrollment_secret:
                raise AuthenticationError(
                    "a new node must present the fleet enrollment secret (node_register.enrollment_secret)",
                    reason="missing",
                )
            if not self.enrollment_secret or not _secret_matches(enrollment_secret, self.enrollment_secret):
                raise AuthenticationError("wrong enrollment secret")
            return NodeAdmission("enrolled")
        if not node_token:
            raise AuthenticationError(
                f"node id {node_id} needs its node token (node_register.node_token); a node that lost "
                "its token enrolls again without a node id",
                reason="missing",
            )
        if not verify_node_token(self.keys, node_id, node_token):
            # the same answer for a forged token, another node's token and a token of a retired key
            raise AuthenticationError(f"the node token is not valid for node id {node_id}")
        if self.is_revoked(node_id):
            raise AuthenticationError(
                f"the node token of {node_id} has been revoked; enroll again", reason="revoked"
            )
        return NodeAdmission("token")


# --- tenant API keys ---------------------------------------------------------------------------------


def hash_api_key(key: str) -> str:
    """The value to configure as ``key_sha256`` for an API key: lowercase hex SHA-256 of its UTF-8."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant_id: str
    #: concurrent sessions; 0 = unlimited
    max_sessions: int = 0
    #: jobs per second (token bucket refill); 0 = unlimited
    max_jobs_per_second: float = 0.0
    #: bucket size; 0 = one second's worth (at least 1)
    jobs_burst: int = 0


class TenantKeys:
    """Maps a presented API key to its tenant, by hash, in constant time per configured key."""

    def __init__(self, entries: Iterable[tuple[str, Tenant]]) -> None:
        #: (sha256 digest, tenant); the configured hex is decoded once
        self._entries = [(bytes.fromhex(h), t) for h, t in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> Tenant | None:
        digest = hashlib.sha256(key.encode()).digest()
        found: Tenant | None = None
        for expected, tenant in self._entries:
            # no early exit: the time taken does not depend on which entry (if any) matched
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found


# --- limits ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _TenantState:
    sessions: set[str] = field(default_factory=set)
    bucket: TokenBucket | None = None


class TenantLimits:
    """Concurrent sessions and job rate per tenant, across the instances sharing a store.

    Sessions are not counted down by a hook on close: ``admit_session`` prunes the tenant's set with
    ``is_live`` (the shell passes "is this session still in the session table"), so a session that
    ended by any path stops counting and nothing has to remember to release it. The set of a tenant
    never holds more than ``max_sessions`` ids.

    Several instances (multi-instance mode) share each tenant's limits: ``share()`` is told, once per
    cluster tick, how many sessions of each tenant the other instances hold. A session is admitted
    while this instance's live sessions plus those stay under the cap (instances learn of each other's
    sessions one tick late, so simultaneous openings on several instances can pass the cap by what
    the others admitted within that tick), and this instance's job bucket gets the part of the
    tenant's rate that its sessions are of the tenant's sessions.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._tenants: dict[str, _TenantState] = {}
        #: tenant id -> its sessions on the other instances, as of the last tick
        self.elsewhere: dict[str, int] = {}
        #: tenant id -> the part of its job rate this instance holds (1.0 when alone)
        self.rate_share: dict[str, float] = {}

    def _state(self, tenant: Tenant) -> _TenantState:
        st = self._tenants.get(tenant.tenant_id)
        if st is None:
            st = self._tenants[tenant.tenant_id] = _TenantState()
        if tenant.max_jobs_per_second > 0 and st.bucket is None:
            burst = tenant.jobs_burst or max(1.0, tenant.max_jobs_per_second)
            st.bucket = TokenBucket(tenant.max_jobs_per_second, burst, self.clock.monotonic())
        return st

    def admit_session(self, tenant: Tenant, session_id: str, is_live: Callable[[str], bool]) -> bool:
        if tenant.max_sessions <= 0:
            return True
        st = self._state(tenant)
        st.sessions = {s for s in st.sessions if is_live(s)}
        if len(st.sessions) + self.elsewhere.get(tenant.tenant_id, 0) >= tenant.max_sessions:
            return False
        st.sessions.add(session_id)
        return True

    def count_session(self, tenant: Tenant, session_id: str, is_live: Callable[[str], bool]) -> None:
        """A session the shared store admitted under the cluster-wide cap: count it here (for the
        job-rate share) without checking again."""
        st = self._state(tenant)
        st.sessions = {s for s in st.sessions if is_live(s)}
        st.sessions.add(session_id)

    def share(self, tenants: Iterable[Tenant], local: dict[str, int], elsewhere: dict[str, int]) -> None:
        """Sessions of each tenant here (``local``) and on the other instances (``elsewhere``): the
        session caps count both, and each job bucket gets this instance's part of its tenant's rate
        (by sessions: a tenant's jobs come from its sessions), never below one job per second (or the
        whole rate, if lower) so that a tenant's first session here is not starved until the next
        tick."""
        self.elsewhere = {t: n for t, n in elsewhere.items() if n > 0}
        for tenant in tenants:
            if tenant.max_jobs_per_second <= 0:
                continue
            here, there = local.get(tenant.tenant_id, 0), self.elsewhere.get(tenant.tenant_id, 0)
            part = 1.0 if there == 0 else here / (here + there)
            self.rate_share[tenant.tenant_id] = part
            bucket = self._state(tenant).bucket
            assert bucket is not None
            full_burst = tenant.jobs_burst or max(1.0, tenant.max_jobs_per_second)
            bucket.reshape(
                max(min(1.0, tenant.max_jobs_per_second), tenant.max_jobs_per_second * part),
                max(1.0, full_burst * part),
            )

    def reset_bucket(self, tenant_id: str) -> None:
        """The tenant's job rate changed (configuration reload): its next job starts a bucket of the new
        shape (full)."""
        st = self._tenants.get(tenant_id)
        if st is not None:
            st.bucket = None

    def sessions_of(self, tenant_id: str, is_live: Callable[[str], bool]) -> int:
        st = self._tenants.get(tenant_id)
        return 0 if st is None else sum(1 for s in st.sessions if is_live(s))

    def admit_jobs(self, tenant: Tenant, n: int = 1) -> bool:
        if tenant.max_jobs_per_second <= 0:
            return True
        bucket = self._state(tenant).bucket
        assert bucket is not None
        # an utterance for more targets than the bucket holds takes the whole bucket, not never
        return bucket.take(self.clock.monotonic(), min(float(n), bucket.burst))
