"""SIGHUP reloads ``[auth]`` and the TLS certificate of a real ``serve`` process, without a restart.

One process, its configuration in a file: a tenant key added to the file works after SIGHUP, a removed
one is refused for new sessions (a session it opened before goes on), a broken file is refused and
logged while the running configuration keeps working, and a certificate replaced on disk is what new
connections are served (the peer certificate's SHA-256 is compared with the file's).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp

from lingua_scheduler.core.auth import hash_api_key
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.conftest import eventually
from tests.scheduler_process import SchedulerProcess
from tests.server.test_auth import self_signed

OLD_KEY = "reload-old-key-" + "o" * 32
NEW_KEY = "reload-new-key-" + "n" * 32


def config_text(cert: Path, key: Path, tenants: list[tuple[str, str]]) -> str:
    lines = ["[tls]", f'cert_file = "{cert}"', f'key_file = "{key}"', ""]
    for tenant_id, api_key in tenants:
        lines += [
            "[[auth.tenants]]",
            f'tenant_id = "{tenant_id}"',
            f'key_sha256 = "{hash_api_key(api_key)}"',
            "",
        ]
    return "\n".join(lines)


def fingerprint_of_file(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


async def served_fingerprint(port: int) -> str:
    """The SHA-256 of the certificate a new TLS connection is served."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return hashlib.sha256(der).hexdigest()
    finally:
        writer.close()


def log_lines(proc: SchedulerProcess) -> list[dict[str, Any]]:
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


async def open_session(
    http: aiohttp.ClientSession, url: str, key: str
) -> tuple[SimulatedSession, dict[str, Any]]:
    s = SimulatedSession(http, url, api_key=key)
    return s, await s.start()


async def test_sighup_reloads_tenant_keys_and_certificate(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    cert_a, key_a = self_signed(tmp_path / "a")
    cert_b, key_b = self_signed(tmp_path / "b")
    assert fingerprint_of_file(cert_a) != fingerprint_of_file(cert_b)
    live_cert, live_key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    shutil.copy(cert_a, live_cert)
    shutil.copy(key_a, live_key)
    cfg = tmp_path / "scheduler.toml"
    cfg.write_text(config_text(live_cert, live_key, [("acme", OLD_KEY)]))

    proc = SchedulerProcess(args=["--config", str(cfg)]).start()
    port = proc.port
    session_url = f"wss://127.0.0.1:{port}/ws/session"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(f"https://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.proc is not None and proc.proc.poll() is None, proc.log_tail()
                assert time.monotonic() < deadline, proc.log_tail()
                await asyncio.sleep(0.05)
            assert await served_fingerprint(port) == fingerprint_of_file(cert_a)

            kept, ack = await open_session(http, session_url, OLD_KEY)
            assert ack["type"] == "session_init_ack", ack
            _, ack = await open_session(http, session_url, NEW_KEY)
            assert ack["type"] == "error" and ack["code"] == "UNAUTHORIZED"

            # the new key replaces the old one; the certificate is replaced on disk under the same path
            cfg.write_text(config_text(live_cert, live_key, [("acme", NEW_KEY), ("globex", OLD_KEY + "x")]))
            shutil.copy(cert_b, live_cert)
            shutil.copy(key_b, live_key)
            proc.signal(signal.SIGHUP)
            await eventually(
                lambda: any(line.get("msg") == "configuration reloaded" for line in log_lines(proc)),
                timeout=10,
            )
            _, ack = await open_session(http, session_url, NEW_KEY)
            assert ack["type"] == "session_init_ack", ack
            _, ack = await open_session(http, session_url, OLD_KEY)
            assert ack["type"] == "error" and ack["code"] == "UNAUTHORIZED"
            assert await served_fingerprint(port) == fingerprint_of_file(cert_b)
            # the session the old key opened goes on: a removed key ends no session
            beat = kept.wait_for(lambda m: m.get("type") == "server_heartbeat")
            await kept.send({"type": "client_heartbeat", "session_id": kept.session_id, "timestamp": 1})
            await beat
            assert kept.ws is not None and not kept.ws.closed

            [done] = [line for line in log_lines(proc) if line.get("msg") == "configuration reloaded"]
            changes = done["changes"]
            assert changes["auth"]["tenants_added"] == ["globex"]
            assert changes["auth"]["tenant_keys_changed"] == {"acme": {"keys_added": 1, "keys_removed": 1}}
            assert changes["tls"]["fingerprint"] == fingerprint_of_file(cert_b)
            assert changes["tls"]["previous_fingerprint"] == fingerprint_of_file(cert_a)
            text = proc.log_path.read_text()
            assert hash_api_key(NEW_KEY) not in text and NEW_KEY not in text  # no key, no hash logged

            # a broken file is refused and logged; the running configuration keeps working
            cfg.write_text(config_text(live_cert, live_key, [("acme", NEW_KEY)]) + "\n[auth]\nbogus = 1\n")
            proc.signal(signal.SIGHUP)
            await eventually(
                lambda: any(
                    line.get("msg", "").startswith("configuration reload refused") for line in log_lines(proc)
                ),
                timeout=10,
            )
            [refused] = [
                line
                for line in log_lines(proc)
                if line.get("msg", "").startswith("configuration reload refused")
            ]
            assert refused["level"] == "error", refused
            _, ack = await open_session(http, session_url, NEW_KEY)
            assert ack["type"] == "session_init_ack", ack

            # a certificate that does not match its key is refused too, and the served one stays
            cfg.write_text(config_text(cert_a, key_b, [("acme", OLD_KEY)]))
            proc.signal(signal.SIGHUP)
            await eventually(
                lambda: (
                    sum(
                        line.get("msg", "").startswith("configuration reload refused")
                        for line in log_lines(proc)
                    )
                    == 2
                ),
                timeout=10,
            )
            refusals = [
                line
                for line in log_lines(proc)
                if line.get("msg", "").startswith("configuration reload refused")
            ]
            assert refusals[-1]["key"] == "tls.cert_file"
            assert await served_fingerprint(port) == fingerprint_of_file(cert_b)
            _, ack = await open_session(http, session_url, OLD_KEY)  # the auth change was not applied either
            assert ack["type"] == "error" and ack["code"] == "UNAUTHORIZED"
            async with http.get(f"https://127.0.0.1:{port}/metrics") as r:
                metrics = await r.text()
            assert 'lingua_config_reloads_total{result="ok"} 1.0' in metrics
            assert 'lingua_config_reloads_total{result="refused"} 2.0' in metrics
            assert proc.proc is not None and proc.proc.poll() is None
    finally:
        proc.close()
