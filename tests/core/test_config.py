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
        ({"LINGUA_SERVER__PORT": "abc"}, "server.port", "expected an integer, got a string"),
        ({"LINGUA_SERVER__PORT": "70000"}, "server.port", "must be in 0..65535, got 70000"),
        ({"LINGUA_SERVER__NOPE": "1"}, "server.nope", "unknown key"),
        ({"LINGUA_BOGUS__X": "1"}, "bogus", "unknown key"),
        ({"LINGUA_SERVER__LOG_LEVEL": "loud"}, "server.log_level", "must be one of: 'debug', "),
        ({"LINGUA_NODE_HEALTH__HEALTH_CHECK_COUNT": "0"}, "node_health.health_check_count", "must be >= 1"),
        ({"LINGUA_SCHEDULER__RESOURCE_THRESHOLD": "150"}, "scheduler.resource_threshold", "(0, 100]"),
        ({"LINGUA_JOBS__MAX_JOBS": "-1"}, "jobs.max_jobs", "must be > 0, got -1"),
        ({"LINGUA_ADMIN__MAX_METRIC_PAIRS": "0"}, "admin.max_metric_pairs", "between 1 and 256"),
        ({"LINGUA_ADMIN__MAX_METRIC_PAIRS": "257"}, "admin.max_metric_pairs", "between 1 and 256"),
        (
            {"LINGUA_AUTH__TENANTS": '[{tenant_id = "a"}]'},
            "auth.tenants[0].key_sha256",
            "missing required key",
        ),
    ],
)
def test_bad_environment_value_names_the_variable(env: dict[str, str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env=env)
    [variable] = env
    assert (e.value.key, e.value.env_var, e.value.file) == (key, variable, None)
    assert reason in e.value.reason
    assert str(e.value).startswith(f"{variable}: ") and repr(key) in str(e.value)


def test_bad_file_value_names_the_key_and_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 70000\n[jobs]\nmax_jobs = "many"\n')
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert (e.value.key, e.value.file, e.value.env_var) == ("server.port", str(f), None)
    assert str(e.value) == f"config key 'server.port' in {f}: must be in 0..65535, got 70000"
    # the environment overrides the file's port: the file's next bad key is reported
    with pytest.raises(ConfigError) as e:
        load_config(f, env={"LINGUA_SERVER__PORT": "80"})
    assert (e.value.key, e.value.file, e.value.reason) == (
        "jobs.max_jobs",
        str(f),
        "expected an integer, got a string",
    )
    # a bad value from the environment over a good file names the variable, not the file
    f.write_text("[server]\nport = 80\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={"LINGUA_SERVER__PORT": "-1"})
    assert (e.value.key, e.value.env_var, e.value.file) == ("server.port", "LINGUA_SERVER__PORT", None)


def test_bad_override_names_the_key_only() -> None:
    """Values given in code (command-line flags) have no variable or file to name."""
    with pytest.raises(ConfigError) as e:
        load_config(env={"LINGUA_SERVER__PORT": "80"}, overrides={"server": {"port": 99999}})
    assert (e.value.key, e.value.env_var, e.value.file) == ("server.port", None, None)
    assert str(e.value) == "config key 'server.port': must be in 0..65535, got 99999"


def test_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[server\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert e.value.key == str(f) and e.value.reason.startswith("not valid TOML")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "missing.toml", env={})
    assert e.value.reason == "config file not found"
    f.write_text("[bogus]\nx = 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert (e.value.key, e.value.reason, e.value.file) == ("bogus", "unknown key", str(f))
