"""The wheel is the product: build it, install it into a fresh virtual environment, run it.

Every other test imports the package from the source tree (an editable install), so a file the
package reads at run time but the wheel leaves out goes unnoticed there; a server installing the
wheel would die at start. Here ``uv build`` makes the sdist and, from it, the wheel (as ``make dist``
does); the wheel goes into a new venv together with the locked runtime dependencies, from uv's cache
only (nothing is downloaded: ``make venv`` has already put the build backend and every runtime
dependency in the cache). Two ``serve`` processes of that venv's entry point share a real
redis-server; a node registers on one, a session on the other gets its utterance translated, the
dashboard's page and assets are served, and every Lua script of the source tree is loaded in Redis.

The data files checked are those of the source tree (``static/``, ``store/lua/``), so a file added
there and forgotten in the package data fails here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from lingua_scheduler.sim.nodes import SimulatedNode
from lingua_scheduler.sim.profiles import NodeProfile
from lingua_scheduler.sim.sessions import SimulatedSession
from tests.redis_support import RedisServer, cluster_cfg, has_redis
from tests.scheduler_process import SchedulerProcess

ROOT = Path(__file__).resolve().parents[1]
SRC_PKG = ROOT / "src" / "lingua_scheduler"
#: the files the package reads at run time, relative to the package, as the source tree has them
STATIC = sorted(p.name for p in (SRC_PKG / "static").iterdir() if p.is_file())
LUA = sorted(p.name for p in (SRC_PKG / "store" / "lua").glob("*.lua"))
DATA = [f"static/{n}" for n in STATIC] + [f"store/lua/{n}" for n in LUA]
#: what Redis names each script by (redis-py loads a script's text as it is in the file)
SHAS = {n: hashlib.sha1((SRC_PKG / "store" / "lua" / n).read_bytes()).hexdigest() for n in LUA}


def uv_binary() -> str:
    """The uv the Makefile installs (pinned), else one on PATH."""
    pinned = ROOT / ".uv" / "bin" / "uv"
    if pinned.exists():
        return str(pinned)
    found = shutil.which("uv")
    if found is None:
        raise RuntimeError("no uv: run `make venv` (it installs the pinned uv into .uv/)")
    return found


def uv_env() -> dict[str, str]:
    """uv never downloads here: no Python, and no package the cache lacks."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    env["UV_OFFLINE"] = "1"
    env["UV_PYTHON_DOWNLOADS"] = "never"
    return env


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env if env is not None else uv_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def clean_tree(dest: Path) -> Path:
    """The files a build reads (the top-level files and ``src/``), without what earlier builds left.

    setuptools takes the file list of a ``*.egg-info/SOURCES.txt`` it finds in the tree as part of the
    sdist, and the wheel is built from the sdist: a stale one from an earlier build (or from the
    editable install) can put files in the wheel that the package data no longer names, which would
    hide exactly the mistake this module is for. ``make dist`` deletes it before building.
    """
    dest.mkdir()
    for p in ROOT.iterdir():
        if p.is_file():
            shutil.copy2(p, dest / p.name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    return dest


def server_env() -> dict[str, str]:
    """The environment the scheduler processes get (SchedulerProcess drops LINGUA_* the same way)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LINGUA_")}


@dataclass(frozen=True)
class Installed:
    wheel: Path
    sdist: Path
    venv: Path
    #: a directory outside the repository: the installed processes run there
    workdir: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def entry_point(self) -> Path:
        return self.venv / "bin" / "lingua-scheduler"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Build once for the module; install the wheel and the locked runtime dependencies into a new venv."""
    uv = uv_binary()
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    run(uv, "build", "--quiet", "--out-dir", dist, cwd=clean_tree(tmp / "tree"))
    wheels = list(dist.glob("*.whl"))
    sdists = list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    # the runtime part of uv.lock, with the locked files' URLs and hashes: uv installs those from its
    # cache (a requirements list would need the index pages, which the cache of `uv sync` lacks)
    lock = tmp / "pylock.toml"
    run(
        uv,
        "export",
        "--frozen",
        "--quiet",
        "--no-default-groups",
        "--no-emit-project",
        "--format",
        "pylock.toml",
        "--output-file",
        lock,
    )
    venv = tmp / "venv"
    python = venv / "bin" / "python"
    run(uv, "venv", "--quiet", "--python", sys.executable, venv)
    run(uv, "pip", "install", "--quiet", "--python", python, "-r", lock)
    # then the wheel, its dependencies resolved against what is installed: one missing from the lock
    # would have to be downloaded, which fails offline
    run(uv, "pip", "install", "--quiet", "--python", python, wheels[0])
    run(uv, "pip", "check", "--quiet", "--python", python)
    workdir = tmp / "work"
    workdir.mkdir()
    yield Installed(wheel=wheels[0], sdist=sdists[0], venv=venv, workdir=workdir)
    shutil.rmtree(tmp, ignore_errors=True)


def test_wheel_holds_every_runtime_file(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        missing = [f for f in DATA if f"lingua_scheduler/{f}" not in names]
        assert not missing, f"the wheel lacks {missing}"
        for f in DATA:
            assert whl.read(f"lingua_scheduler/{f}") == (SRC_PKG / f).read_bytes(), f
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the wheel lacks LICENSE"
        assert "lingua_scheduler/py.typed" in names


def test_sdist_holds_the_licence_the_change_log_and_every_runtime_file(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as sdist:
        top = installed.sdist.name.removesuffix(".tar.gz")
        names = {n.removeprefix(top + "/") for n in sdist.getnames()}
    wanted = ["LICENSE", "CHANGELOG.md", "pyproject.toml", *(f"src/lingua_scheduler/{f}" for f in DATA)]
    assert [f for f in wanted if f not in names] == []


def test_installed_package_is_imported_from_the_new_venv(installed: Installed) -> None:
    """The package the servers run is the installed one (not the source tree), and it finds its data
    files through importlib.resources."""
    probe = (
        "import importlib.resources as r, json, sysconfig, lingua_scheduler\n"
        "pkg = r.files('lingua_scheduler')\n"
        f"data = {DATA!r}\n"
        "print(json.dumps({'file': lingua_scheduler.__file__, 'purelib': sysconfig.get_path('purelib'),"
        " 'readable': [f for f in data if pkg.joinpath(*f.split('/')).is_file()]}))\n"
    )
    got = json.loads(run(installed.python, "-c", probe, cwd=installed.workdir, env=server_env()))
    location = Path(got["file"]).resolve()
    assert location.is_relative_to(Path(got["purelib"]).resolve()), location
    assert location.is_relative_to(installed.venv.resolve()), location
    assert not location.is_relative_to(SRC_PKG), location
    assert got["readable"] == DATA


# --- two installed instances on one Redis ------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if not has_redis():
        pytest.skip("no redis-server binary")
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _ready_nodes(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(base + "/api/v1/nodes") as r:
        body = await r.json()
    listed = body["nodes"] if isinstance(body, dict) else body
    return sum(1 for x in listed if x["status"] == "ready")


async def test_two_installed_instances_translate_serve_the_dashboard_and_load_every_script(
    installed: Installed, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """A (nodes) and B (sessions) from the installed entry point with ``--redis-url``: B dispatches
    to A's node through Redis and routes the result back; every asset and script is the source tree's."""
    with redis_server.client() as r:
        assert not any(r.script_exists(*SHAS.values())), "the module's redis-server is not fresh"
    sections = cluster_cfg(redis_server.url, "w" + secrets.token_hex(3))
    # the URL comes from the command line, the way an operator starts an instance
    del sections["cluster"]["redis_url"]
    procs = [
        SchedulerProcess(
            program=[str(installed.entry_point)],
            args=["--redis-url", redis_server.url],
            cwd=installed.workdir,
            **sections,
        ).start()
        for _ in range(2)
    ]
    a, b = procs
    profile = NodeProfile(asr_languages=["en", "zh"], tts_languages=["en", "zh"], nmt_languages=["en", "zh"])
    node = SimulatedNode(http, a.node_url, profile)
    session = SimulatedSession(http, b.session_url, src_lang="en", tgt_lang="zh")
    try:
        for p in procs:
            await p.wait_ready(http)
        assert (await node.start())["type"] == "node_register_ack"
        for _ in range(200):
            if await _ready_nodes(http, b.base) == 1:
                break
            await asyncio.sleep(0.05)
        assert await _ready_nodes(http, b.base) == 1, "B never saw A's node ready"
        assert (await session.start())["type"] == "session_init_ack"
        result = session.wait_for(lambda m: m.get("type") in ("translation_result", "missing_result"), 15)
        index = await session.utterance()
        got = await result
        assert got["type"] == "translation_result" and got["utterance_index"] == index, got
        assert node.jobs_done == 1

        async with http.get(b.base + "/dashboard") as resp:
            assert resp.status == 200
            page = await resp.read()
        assert page == (SRC_PKG / "static" / "dashboard.html").read_bytes()
        for name in STATIC:
            if name == "dashboard.html":
                continue
            assert f"/dashboard/static/{name}".encode() in page, f"the page does not load {name}"
            async with http.get(f"{b.base}/dashboard/static/{name}") as resp:
                assert resp.status == 200, name
                assert await resp.read() == (SRC_PKG / "static" / name).read_bytes(), name

        # the server was fresh: every script in Redis was loaded by the installed instances
        with redis_server.client() as r:
            loaded = r.script_exists(*SHAS.values())
        assert dict(zip(SHAS, loaded, strict=True)) == dict.fromkeys(SHAS, True)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- A:\n{a.log_tail()}\n--- B:\n{b.log_tail()}") from None
    finally:
        await asyncio.gather(node.close(), session.disconnect(), return_exceptions=True)
        for p in procs:
            p.close()
