"""The registry core without sockets: registration, heartbeats, status machine, liveness, fleet view."""

from __future__ import annotations

import msgspec
import pytest

from lingua_scheduler.clock import ManualClock
from lingua_scheduler.config import NodeHealthConfig
from lingua_scheduler.core.capabilities import Capabilities, derive
from lingua_scheduler.core.fleet_view import FleetViewPublisher
from lingua_scheduler.core.registry import Registry
from lingua_scheduler.core.status import TRANSITIONS, IllegalTransition, NodeStatus, check_transition
from lingua_scheduler.errors import NotRegisteredError, RegistrationError
from lingua_scheduler.protocol.common import ServiceStatus
from lingua_scheduler.protocol.node import (
    CapabilityByType,
    InstalledService,
    NodeHeartbeat,
    NodeLanguageCapabilities,
    ResourceUsage,
)
from lingua_scheduler.sim.profiles import NodeProfile

S = NodeStatus


def profile(langs: list[str] | None = None) -> NodeProfile:
    langs = langs or ["en", "zh"]
    return NodeProfile(asr_languages=langs, tts_languages=langs, nmt_languages=langs)


def heartbeat(
    node_id: str, p: NodeProfile, running: int = 0, cpu: float = 10.0, **changes: object
) -> NodeHeartbeat:
    hb = NodeHeartbeat(
        node_id=node_id,
        timestamp=1,
        resource_usage=ResourceUsage(
            cpu_percent=cpu, mem_percent=30.0, running_jobs=running, gpu_percent=20.0
        ),
        installed_services=p.services(),
        capability_by_type=p.capability_by_type(),
        language_capabilities=p.languages(),
    )
    return msgspec.structs.replace(hb, **changes) if changes else hb


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def registry(clock: ManualClock) -> Registry:
    return Registry(
        NodeHealthConfig(
            heartbeat_interval_seconds=5, heartbeat_timeout_seconds=15, warmup_timeout_seconds=60
        ),
        clock,
    )


def register(registry: Registry, p: NodeProfile, conn: object, node_id: str | None = None) -> str:
    entry, _ = registry.register(p.register_message(node_id), conn)
    return entry.node_id


def test_register_then_ready_after_healthy_heartbeat(registry: Registry) -> None:
    p, conn = profile(), object()
    nid = register(registry, p, conn)
    assert registry.nodes[nid].status is S.REGISTERING
    out = registry.heartbeat(conn, heartbeat(nid, p))
    assert [t.new for t in out.transitions] == [S.READY]
    registry.validate()


def test_health_check_count(clock: ManualClock) -> None:
    reg = Registry(NodeHealthConfig(health_check_count=3), clock)
    p, conn = profile(), object()
    nid = register(reg, p, conn)
    assert reg.heartbeat(conn, heartbeat(nid, p)).transitions == ()
    assert reg.heartbeat(conn, heartbeat(nid, p)).transitions == ()
    assert reg.heartbeat(conn, heartbeat(nid, p)).transitions[0].new is S.READY


def test_unhealthy_heartbeats_degrade_and_recover(registry: Registry) -> None:
    p, conn = profile(), object()
    nid = register(registry, p, conn)
    registry.heartbeat(conn, heartbeat(nid, p))
    sick = NodeProfile(
        asr_languages=["en"], tts_languages=["en"], nmt_languages=["en"], services_running=False
    )
    bad = heartbeat(nid, p, installed_services=sick.services())
    assert registry.heartbeat(conn, bad).transitions == ()
    assert registry.heartbeat(conn, bad).transitions == ()
    assert registry.heartbeat(conn, bad).transitions[0].new is S.DEGRADED
    assert registry.heartbeat(conn, heartbeat(nid, p)).transitions[0].new is S.READY
    registry.validate()


def test_load_is_not_capability(registry: Registry) -> None:
    p, conn = profile(), object()
    nid = register(registry, p, conn)
    registry.heartbeat(conn, heartbeat(nid, p))
    registry.take_dirty()
    version = registry.nodes[nid].version_no
    for i in range(100):
        out = registry.heartbeat(conn, heartbeat(nid, p, running=i % 5, cpu=float(i % 90)))
        assert not out.capability_changed
    assert registry.dirty_count == 0
    assert registry.nodes[nid].version_no == version
    assert registry.nodes[nid].load.reported_running == 99 % 5


def test_capability_change_by_value(registry: Registry) -> None:
    p, conn = profile(), object()
    nid = register(registry, p, conn)
    registry.heartbeat(conn, heartbeat(nid, p))
    registry.take_dirty()
    changes = registry.capability_changes
    # same content, different order: not a change
    reordered = NodeLanguageCapabilities(
        asr_languages=["zh", "en"],
        tts_languages=["zh", "en"],
        nmt_capabilities=p.languages().nmt_capabilities,
    )
    assert not registry.heartbeat(conn, heartbeat(nid, p, language_capabilities=reordered)).capability_changed
    # a service stopping is a change (readiness differs)
    stopped = [
        msgspec.structs.replace(s, status=ServiceStatus.STOPPED) if s.service_id == "piper-tts" else s
        for s in p.services()
    ]
    assert registry.heartbeat(conn, heartbeat(nid, p, installed_services=stopped)).capability_changed
    assert registry.capability_changes == changes + 1
    assert nid in registry.take_dirty()


def test_binding_refuses_foreign_and_unregistered(registry: Registry) -> None:
    p, a, b = profile(), object(), object()
    nid = register(registry, p, a)
    with pytest.raises(NotRegisteredError) as e:
        registry.heartbeat(b, heartbeat(nid, p))
    assert e.value.code == "NODE_ID_MISMATCH"
    with pytest.raises(NotRegisteredError) as e:
        registry.heartbeat(b, heartbeat("node-UNKNOWN", p))
    assert e.value.code == "NOT_REGISTERED"
    assert registry.nodes[nid].heartbeats == 0


def test_conflict_reconnect_and_stale_cleanup(registry: Registry) -> None:
    p, old, new = profile(), object(), object()
    nid = register(registry, p, old)
    with pytest.raises(RegistrationError) as e:
        register(registry, p, new, nid)
    assert e.value.code == "NODE_ID_CONFLICT"
    assert registry.disconnect(nid, old)[0].new is S.OFFLINE
    assert register(registry, p, new, nid) == nid  # same id, same record
    assert len(registry) == 1
    # the old connection's late cleanup must not touch the new one
    assert registry.disconnect(nid, old) == ()
    assert registry.nodes[nid].conn is new
    registry.validate()


def test_heartbeat_timeout_and_loop_lag_suppression(registry: Registry, clock: ManualClock) -> None:
    p, conn = profile(), object()
    nid = register(registry, p, conn)
    registry.heartbeat(conn, heartbeat(nid, p))
    clock.advance(16)
    out = registry.scan(loop_lag=5.0)  # we were stalled: do not blame the node
    assert out.transitions == () and out.suppressed == 1
    out = registry.scan(loop_lag=0.0)
    assert [t.new for t in out.transitions] == [S.OFFLINE]
    # heartbeats resume on the open socket: registering, then ready
    out2 = registry.heartbeat(conn, heartbeat(nid, p))
    assert [t.new for t in out2.transitions] == [S.REGISTERING, S.READY]


def test_warmup_timeout(registry: Registry, clock: ManualClock) -> None:
    p, conn = profile(), object()
    nid = register(registry, p, conn)
    for _ in range(7):
        clock.advance(10)
        registry.heartbeat(conn, heartbeat(nid, p, installed_services=[]))  # unhealthy: nothing installed
    out = registry.scan(loop_lag=0.0)
    assert [t.new for t in out.transitions] == [S.DEGRADED]


def test_drain_and_undrain(registry: Registry) -> None:
    p, conn = profile(), object()
    nid = register(registry, p, conn)
    registry.heartbeat(conn, heartbeat(nid, p))
    assert registry.drain(nid)[0].new is S.DRAINING
    assert registry.heartbeat(conn, heartbeat(nid, p)).transitions == ()
    assert registry.nodes[nid].status is S.DRAINING
    assert registry.undrain(nid)[0].new is S.READY


def test_a_node_drain_ends_with_its_process_an_operator_drain_does_not(registry: Registry) -> None:
    p = profile()

    def back(nid: str) -> S:
        conn = object()
        registry.disconnect(nid, registry.nodes[nid].conn)
        register(registry, p, conn, nid)
        registry.heartbeat(conn, heartbeat(nid, p))
        return registry.nodes[nid].status

    conn = object()
    nid = register(registry, p, conn)
    registry.heartbeat(conn, heartbeat(nid, p))
    assert "by the node" in registry.drain(nid, by_node=True)[0].reason
    assert back(nid) is S.READY  # a new registration: the node's own drain is over
    registry.drain(nid)  # operator first, then the node: the operator's drain stays
    registry.drain(nid, by_node=True)
    assert back(nid) is S.DRAINING
    registry.undrain(nid)
    registry.drain(nid, by_node=True)  # the node first, then the operator: the operator's stays
    registry.drain(nid)
    assert back(nid) is S.DRAINING
    registry.validate()


def test_declared_slots_and_load_threshold(clock: ManualClock, registry: Registry) -> None:
    p, conn = profile(), object()
    entry, _ = registry.register(
        msgspec.structs.replace(p.register_message(None), max_concurrent_jobs=2, load_threshold=0.7), conn
    )
    publisher = FleetViewPublisher(registry, clock, max_concurrent_jobs=4)
    registry.heartbeat(conn, heartbeat(entry.node_id, p))
    publisher.publish()
    nv = publisher.view.get(entry.node_id)
    assert nv is not None and nv.max_concurrent_jobs == 2
    hb = heartbeat(entry.node_id, p)
    registry.heartbeat(
        conn, msgspec.structs.replace(hb, resource_usage=msgspec.structs.replace(hb.resource_usage, load=0.7))
    )
    assert entry.load.over_threshold(85.0)
    registry.heartbeat(
        conn,
        msgspec.structs.replace(hb, resource_usage=msgspec.structs.replace(hb.resource_usage, load=0.69)),
    )
    assert not entry.load.over_threshold(85.0)


def test_heartbeat_interval_scales_with_fleet(clock: ManualClock) -> None:
    reg = Registry(
        NodeHealthConfig(
            heartbeat_interval_seconds=5, heartbeat_budget_per_second=100, heartbeat_timeout_seconds=15
        ),
        clock,
    )
    p = profile()
    for _ in range(400):
        register(reg, p, object())
    assert reg.heartbeat_interval() == pytest.approx(5.0)  # 400 nodes / 5 s = 80/s: within budget
    for _ in range(600):
        register(reg, p, object())
    assert reg.heartbeat_interval() == pytest.approx(10.0)
    assert reg.heartbeat_timeout() == pytest.approx(30.0)


def test_transition_table_rejects_illegal() -> None:
    with pytest.raises(IllegalTransition):
        check_transition("n", S.OFFLINE, S.READY)
    for src, dsts in TRANSITIONS.items():
        for dst in NodeStatus:
            if dst in dsts:
                check_transition("n", src, dst)
            else:
                with pytest.raises(IllegalTransition):
                    check_transition("n", src, dst)


def test_fleet_view_incremental_and_immutable(registry: Registry, clock: ManualClock) -> None:
    pub = FleetViewPublisher(registry, clock, max_concurrent_jobs=4)
    p = profile()
    conns = [object() for _ in range(3)]
    ids = [register(registry, p, c) for c in conns]
    assert pub.publish() is not None
    v1 = pub.view
    assert set(v1.nodes) == set(ids)
    clock.advance(0.1)
    registry.heartbeat(conns[0], heartbeat(ids[0], p))  # status change of one node
    stats = pub.publish()
    assert stats is not None and stats.changed == 1 and stats.lag == pytest.approx(0.0)
    v2 = pub.view
    assert v2.version == v1.version + 1
    assert v1.nodes[ids[0]].status is S.REGISTERING  # the old view did not change under its reader
    assert v2.nodes[ids[0]].status is S.READY
    assert v2.nodes[ids[1]] is v1.nodes[ids[1]]  # unchanged nodes are shared, not copied
    # load-only heartbeat: nothing to publish, yet the view's live load is current
    registry.heartbeat(conns[0], heartbeat(ids[0], p, running=3))
    assert pub.publish() is None
    assert pub.view.nodes[ids[0]].load.reported_running == 3


def test_protocol_generation_from_features_and_shape(registry: Registry) -> None:
    p = profile()
    acking = registry.nodes[register(registry, p, object(), "n-ack")]
    assert (acking.sends_acks, acking.turn_dialect) == (True, False)
    quiet = NodeProfile(asr_languages=["en"], tts_languages=["en"], nmt_languages=["en"], sends_acks=False)
    entry = registry.nodes[register(registry, quiet, object(), "n-quiet")]
    assert (entry.sends_acks, entry.turn_dialect) == (False, False)
    # the newer client's capability_by_type shape (devices per type) means the turn dialect
    msg = quiet.register_message("n-head")
    msg.capability_by_type = [
        CapabilityByType(type=c.type, ready=c.ready, devices=["gpu"]) for c in msg.capability_by_type
    ]
    head, _ = registry.register(msg, object())
    assert (head.sends_acks, head.turn_dialect) == (False, True)


def test_unknown_service_kinds_are_kept_not_routed_and_counted_once(registry: Registry) -> None:
    p = profile()
    msg = p.register_message("n1")
    extra = [
        InstalledService(service_id="lex", type="lexicon", device="npu", status=ServiceStatus.RUNNING),
        InstalledService(service_id="pho", type="phonetic", device="cpu", status=ServiceStatus.RUNNING),
    ]
    msg.installed_services = [*msg.installed_services, *extra]
    msg.capability_by_type = [*msg.capability_by_type, CapabilityByType(type="punctuation", ready=True)]
    conn = object()
    entry, _ = registry.register(msg, conn)
    caps = entry.caps
    assert caps.unknown_types == {"lexicon", "phonetic", "punctuation"}
    assert caps.unknown_devices == {"npu"}
    assert caps.installed_types == {"asr", "nmt", "tts"} and caps.service_type("lex") is None
    assert registry.take_unknown_seen() == {"service_type": 3, "device": 1}
    # the same report again counts nothing; a new kind counts once
    registry.heartbeat(conn, heartbeat("n1", p, installed_services=msg.installed_services))
    assert registry.take_unknown_seen() == {}
    more = InstalledService(service_id="x", type="diarization", device="gpu", status=ServiceStatus.RUNNING)
    registry.heartbeat(conn, heartbeat("n1", p, installed_services=[*msg.installed_services, more]))
    assert registry.take_unknown_seen() == {"service_type": 1}


def test_declared_language_pairs_restrict_served_pairs(registry: Registry) -> None:
    langs = ["zh", "en", "ja"]
    free = NodeProfile(asr_languages=langs, tts_languages=langs, nmt_languages=langs)
    declared = NodeProfile(
        asr_languages=langs, tts_languages=langs, nmt_languages=langs, supported_pairs=[("zh", "en")]
    )
    caps_free = registry.nodes[register(registry, free, object(), "free")].caps
    caps = registry.nodes[register(registry, declared, object(), "declared")].caps
    assert len(caps_free.served_pairs()) == 6 + 3
    assert caps.served_pairs() == {("zh", "en"), ("auto", "en")}
    assert not caps.serves_pair("auto", "ja") and not caps.translates_into("zh")
    assert caps.declared_pairs == {("zh", "en")}


# --- the node app's NMT summary strings -------------------------------------------------------------


def _summary_caps(nmt: list[object], **langs: object) -> Capabilities:
    lang = msgspec.convert({"nmt": nmt, **langs}, NodeLanguageCapabilities)
    services = [
        InstalledService(service_id=sid, type=t, device="gpu", status=ServiceStatus.RUNNING)
        for sid, t in (("asr", "asr"), ("nmt-m2m100", "nmt"), ("tts", "tts"))
    ]
    return derive(services, [], None, lang, frozenset())


def test_nmt_summary_strings_give_the_pairs_of_the_languages_heard_and_spoken() -> None:
    """A 74 node's summary without supported_language_pairs or semantic languages: any_to_any over
    its ASR and TTS languages; en_to_any only from en."""
    heard = {"asr_languages": ["zh", "en", "ja"], "tts_languages": ["zh", "en"]}
    caps = _summary_caps(["nmt-m2m100:any_to_any:37 langs"], **heard)
    assert caps.declared_pairs is None and caps.semantic_languages == frozenset()
    assert {p for p in caps.served_pairs() if p[0] != "auto"} == {
        ("zh", "en"),
        ("en", "zh"),
        ("ja", "en"),
        ("ja", "zh"),
    }
    en_only = _summary_caps(["m:en_to_any:5 langs"], **heard)
    assert {p for p in en_only.served_pairs() if p[0] != "auto"} == {("en", "zh")}


@pytest.mark.parametrize(
    "entry",
    [
        "m:specific_pairs:2 langs",
        "m:any_to_any",
        "m:any_to_any:many langs",
        ":any_to_any:3 langs",
        7,
        {"rule": "any_to_any"},
    ],
)
def test_nmt_summaries_of_another_shape_are_ignored_not_refused(entry: object) -> None:
    caps = _summary_caps([entry], asr_languages=["zh", "en"], tts_languages=["zh", "en"])
    assert caps.nmt == () and {p for p in caps.served_pairs() if p[0] != "auto"} == set()


def test_declared_pairs_and_nmt_capabilities_win_over_the_summary() -> None:
    langs = {"asr_languages": ["zh", "en", "ja"], "tts_languages": ["zh", "en", "ja"]}
    declared = _summary_caps(
        ["m:any_to_any:37 langs"], supported_language_pairs=[{"src": "zh", "tgt": "en"}], **langs
    )
    assert {p for p in declared.served_pairs() if p[0] != "auto"} == {("zh", "en")}
    explicit = _summary_caps(
        ["m:any_to_any:37 langs"],
        nmt_capabilities=[{"model_id": "m", "languages": ["zh", "ja"], "rule": "any_to_any"}],
        **langs,
    )
    assert {p for p in explicit.served_pairs() if p[0] != "auto"} == {("zh", "ja"), ("ja", "zh")}
