"""The pure side of authentication: node tokens, the registration decision, API keys, tenant limits."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import load_config
from lingua_scheduler.core.auth import (
    NodeAuthenticator,
    Tenant,
    TenantKeys,
    TenantLimits,
    derive_signing_key,
    hash_api_key,
    issue_node_token,
    verify_node_token,
)
from lingua_scheduler.errors import AuthenticationError, ConfigError, ErrorCode

SECRET = "enroll-0123456789abcdef"
KEY = derive_signing_key(SECRET)
node_ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,40}", fullmatch=True)


# --- tokens --------------------------------------------------------------------------------------------


def test_token_shape_and_determinism() -> None:
    token = issue_node_token(KEY, "node-1A2B3C4D")
    assert token.startswith("v1.") and "=" not in token
    assert len(token) == 3 + 43  # base64url of 32 bytes without padding
    # any instance holding the key computes the same token: no lookup needed to verify
    assert token == issue_node_token(derive_signing_key(SECRET), "node-1A2B3C4D")
    assert verify_node_token([KEY], "node-1A2B3C4D", token)


def test_signing_key_is_derived_not_the_secret() -> None:
    assert SECRET.encode() != KEY
    assert len(KEY) == 32
    assert derive_signing_key(SECRET + "x") != KEY


@given(node_ids, node_ids)
def test_a_token_is_bound_to_its_node_id(a: str, b: str) -> None:
    token = issue_node_token(KEY, a)
    assert verify_node_token([KEY], a, token)
    assert verify_node_token([KEY], b, token) == (a == b)


def test_tokens_of_another_key_or_tampered_are_refused() -> None:
    token = issue_node_token(KEY, "node-A")
    other = derive_signing_key("another-secret-0123456789")
    assert not verify_node_token([other], "node-A", token)
    assert verify_node_token([other, KEY], "node-A", token)  # a previous key during a rotation
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert not verify_node_token([KEY], "node-A", flipped)
    assert not verify_node_token([KEY], "node-A", "")
    assert not verify_node_token([KEY], "node-A", "v1." + "é" * 43)


# --- registration decision -----------------------------------------------------------------------------


def authenticator(revoked: set[str] | None = None, keys: list[bytes] | None = None) -> NodeAuthenticator:
    bad = revoked if revoked is not None else set()
    return NodeAuthenticator(SECRET, keys or [KEY], lambda node_id: node_id in bad)


def refused(auth: NodeAuthenticator, node_id: str | None, secret: str | None, token: str | None) -> str:
    with pytest.raises(AuthenticationError) as info:
        auth.check(node_id, secret, token)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    return info.value.reason


def test_new_node_needs_the_enrollment_secret() -> None:
    auth = authenticator()
    assert refused(auth, None, None, None) == "missing"
    assert refused(auth, None, "wrong-secret-0123456789", None) == "invalid"
    assert refused(auth, None, SECRET[:-1], None) == "invalid"
    assert auth.check(None, SECRET, None).how == "enrolled"


def test_known_id_needs_its_own_token() -> None:
    auth = authenticator()
    mine, theirs = auth.issue("node-MINE"), auth.issue("node-THEIRS")
    assert auth.check("node-MINE", None, mine).how == "token"
    assert refused(auth, "node-MINE", None, None) == "missing"
    # the enrollment secret never lets a node pick an id: it would let anybody take over any node
    assert refused(auth, "node-MINE", SECRET, None) == "missing"
    assert refused(auth, "node-MINE", None, theirs) == "invalid"
    assert refused(auth, "node-MINE", None, "v1.forged") == "invalid"


def test_revoked_ids_are_refused() -> None:
    revoked: set[str] = set()
    auth = authenticator(revoked)
    token = auth.issue("node-R")
    assert auth.check("node-R", None, token)
    revoked.add("node-R")
    assert refused(auth, "node-R", None, token) == "revoked"
    # a revoked node can enroll again: it gets a new id, the old one stays refused
    assert auth.check(None, SECRET, None).how == "enrolled"


def test_rotation_issues_with_the_new_key_and_accepts_the_old() -> None:
    new = derive_signing_key("rotated-secret-0123456789")
    old_token = issue_node_token(KEY, "node-X")
    auth = authenticator(keys=[new, KEY])
    assert auth.check("node-X", None, old_token)
    assert auth.issue("node-X") == issue_node_token(new, "node-X") != old_token
    assert refused(authenticator(keys=[new]), "node-X", None, old_token) == "invalid"


# --- API keys ------------------------------------------------------------------------------------------


def test_api_keys_are_looked_up_by_hash() -> None:
    assert hash_api_key("k") == hashlib.sha256(b"k").hexdigest()
    keys = TenantKeys([(hash_api_key("key-a"), Tenant("a")), (hash_api_key("key-b"), Tenant("b"))])
    assert len(keys) == 2
    a, b = keys.lookup("key-a"), keys.lookup("key-b")
    assert a is not None and a.tenant_id == "a"
    assert b is not None and b.tenant_id == "b"
    assert keys.lookup("key-c") is None
    assert keys.lookup(hash_api_key("key-a")) is None  # the hash is not a key
    assert keys.lookup("") is None


# --- limits --------------------------------------------------------------------------------------------


def test_session_cap_counts_only_live_sessions() -> None:
    limits = TenantLimits(ManualClock())
    tenant = Tenant("t", max_sessions=2)
    live = {"s1", "s2"}
    assert limits.admit_session(tenant, "s1", live.__contains__)
    assert limits.admit_session(tenant, "s2", live.__contains__)
    assert not limits.admit_session(tenant, "s3", live.__contains__)
    live.discard("s1")  # ended by whatever path: it stops counting without a release call
    live.add("s3")
    assert limits.admit_session(tenant, "s3", live.__contains__)
    assert limits.sessions_of("t", live.__contains__) == 2
    unlimited = Tenant("u")
    assert all(limits.admit_session(unlimited, f"x{i}", lambda _: True) for i in range(100))


def test_job_rate_is_a_token_bucket_per_tenant() -> None:
    clock = ManualClock()
    limits = TenantLimits(clock)
    slow = Tenant("slow", max_jobs_per_second=2.0, jobs_burst=3)
    other = Tenant("other", max_jobs_per_second=1.0)
    assert [limits.admit_jobs(slow) for _ in range(4)] == [True, True, True, False]
    assert limits.admit_jobs(other)  # buckets are per tenant
    assert not limits.admit_jobs(other)  # default burst: one second's worth
    clock.advance(0.5)
    assert limits.admit_jobs(slow) and not limits.admit_jobs(slow)
    clock.advance(10)
    assert [limits.admit_jobs(slow) for _ in range(4)] == [True, True, True, False]  # capped at burst
    # an utterance for more targets than the bucket holds takes the whole bucket instead of never
    clock.advance(10)
    assert limits.admit_jobs(slow, 5) and not limits.admit_jobs(slow)
    assert limits.admit_jobs(Tenant("free"), 1000)


def test_limits_are_shared_with_the_other_instances() -> None:
    """Multi-instance mode: sessions on other instances count against the cap here, and the job rate is
    split by where the tenant's sessions are."""
    clock = ManualClock()
    limits = TenantLimits(clock)
    tenant = Tenant("t", max_sessions=3, max_jobs_per_second=10.0, jobs_burst=10)
    live = {"s1"}
    assert limits.admit_session(tenant, "s1", live.__contains__)
    limits.share([tenant], {"t": 1}, {"t": 2})  # two more on other instances
    assert not limits.admit_session(tenant, "s2", live.__contains__)
    # the rate follows the sessions: 1 of 3 here
    assert limits.rate_share["t"] == pytest.approx(1 / 3)
    admitted = sum(limits.admit_jobs(tenant) for _ in range(20))
    assert admitted == 3  # burst 10 x 1/3, floored
    clock.advance(1.0)
    assert sum(limits.admit_jobs(tenant) for _ in range(20)) == 3  # ~3.3 jobs/s here
    # the others closed theirs: the whole cap and rate are this instance's again
    limits.share([tenant], {"t": 1}, {})
    assert limits.admit_session(tenant, "s2", live.__contains__)
    assert limits.rate_share["t"] == 1.0
    clock.advance(1.0)
    assert sum(limits.admit_jobs(tenant) for _ in range(20)) == 10
    # a tenant with no session here keeps a floor of one job per second (its first session's jobs)
    limits.share([tenant], {"t": 0}, {"t": 3})
    clock.advance(1.0)
    assert sum(limits.admit_jobs(tenant) for _ in range(20)) == 1


# --- configuration -------------------------------------------------------------------------------------


def test_auth_config_validation() -> None:
    def cfg(**auth: object) -> object:
        return load_config(env={}, overrides={"auth": auth}).auth

    off = load_config(env={}).auth
    assert not off.nodes_required and not off.sessions_required
    assert cfg(node_enrollment_secret=SECRET).nodes_required  # type: ignore[attr-defined]
    assert cfg(node_token_secret=SECRET).nodes_required  # type: ignore[attr-defined]  # closed enrollment
    tenant = {"tenant_id": "a", "key_sha256": hash_api_key("k").upper()}
    on = cfg(tenants=[tenant])
    assert on.sessions_required and on.tenants[0].key_sha256 == hash_api_key("k")  # type: ignore[attr-defined]
    dev = cfg(node_enrollment_secret=SECRET, tenants=[tenant], insecure_dev=True)
    assert not dev.nodes_required and not dev.sessions_required  # type: ignore[attr-defined]
    for bad, key in (
        ({"node_enrollment_secret": "short"}, "auth.node_enrollment_secret"),
        ({"node_token_secret": " " + SECRET}, "auth.node_token_secret"),
        ({"node_token_previous_secrets": ["short"]}, "auth.node_token_previous_secrets"),
        ({"tenants": [{"tenant_id": "a", "key_sha256": "k"}]}, "auth.tenants[0].key_sha256"),
        ({"tenants": [tenant, {**tenant, "tenant_id": "b"}]}, "auth.tenants"),
        ({"node_enrollment_secret": "x" * 257}, "auth.node_enrollment_secret"),
        (
            {"tenants": [tenant, {**tenant, "key_sha256": hash_api_key("j"), "max_sessions": 3}]},
            "auth.tenants",
        ),
        ({"tenants": [{**tenant, "max_sessions": -1}]}, "auth.tenants[0].max_sessions"),
    ):
        with pytest.raises(ConfigError) as info:
            cfg(**bad)
        assert info.value.key == key, (bad, info.value)
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"tls": {"cert_file": "c.pem"}})
    assert info.value.key == "tls.key_file"


def test_a_tenant_may_have_several_keys() -> None:
    config = load_config(
        env={},
        overrides={
            "auth": {
                "tenants": [
                    {"tenant_id": "a", "key_sha256": hash_api_key("old"), "max_sessions": 2},
                    {"tenant_id": "a", "key_sha256": hash_api_key("new"), "max_sessions": 2},
                ]
            }
        },
    )
    assert [t.tenant_id for t in config.auth.tenants] == ["a", "a"]


def test_secrets_come_from_the_environment() -> None:
    config = load_config(env={"LINGUA_AUTH__NODE_ENROLLMENT_SECRET": SECRET})
    assert config.auth.node_enrollment_secret == SECRET and config.auth.nodes_required
