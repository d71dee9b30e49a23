"""Configuration: defaults, file, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lingua_scheduler.config import load_config
from lingua_scheduler.errors import ConfigError


def test_defaults() -> None:
    c = load_config(env={})
    assert (c.server.host, c.server.port) == ("127.0.0.1", 5010)
    assert c.node_health.heartbeat_timeout_seconds == 45.0
    assert c.scheduler.resource_threshold == 85.0


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 6000\nhost = "0.0.0.0"\n[node_health]\nhealth_check_count = 2\n')
    c = load_config(f, env={"LINGUA_SERVER__PORT": "7000", "LINGUA_SCHEDULER__RESOURCE_THRESHOLD": "90.5"})
    assert c.server.port == 7000 and c.server.host == "0.0.0.0"
    assert c.node_health.health_check_count == 2
    assert c.scheduler.resource_threshold == 90.5
    c = load_config(f, env={"LINGUA_SERVER__PORT": "7000"}, overrides={"server": {"port": 8000}})
    assert c.server.port == 8000


@pytest.mark.parametrize(
    ("env", "key", "reason"),
    [
        ({"LINGUA_SERVER__PORT": "abc"}, "server.port", "Expected `int`"),
        ({"LINGUA_SERVER__PORT": "70000"}, "server.port", "0..65535"),
        ({"LINGUA_SERVER__NOPE": "1"}, "server.nope", "unknown key"),
        ({"LINGUA_NODE_HEALTH__HEALTH_CHECK_COUNT": "0"}, "node_health.health_check_count", ">= 1"),
        ({"LINGUA_SCHEDULER__RESOURCE_THRESHOLD": "150"}, "scheduler.resource_threshold", "(0, 100]"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env=env)
    assert e.value.key == key
    assert reason in e.value.reason


def test_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
    f.write_text("[bogus]\nx = 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert e.value.key == "bogus" and e.value.reason == "unknown key"
