"""The path a deployment takes (issue 9): an sdist and a wheel built from the
checkout's files as a fresh clone has them, the wheel installed into a
throwaway virtualenv outside the checkout, and the server started from it.

`make` installs the checkout in editable mode, so no other test would notice
a package, a web asset or a dependency that the wheel leaves out.
"""
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import websockets

from conftest import ROOT, SECRET, free_port, require, stop_process, token, update

pytestmark = pytest.mark.integration


def _source_files() -> list[str]:
    """What a clone has: tracked files, plus new ones not yet added (so that a
    developer sees the result before committing), less what .gitignore hides."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def _sh(*cmd, cwd=None, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(sdist, wheel): `python -m build` makes the sdist, then the wheel from
    the sdist in an isolated environment, as pip does: the wheel's build
    checks that pyproject.toml asks for all it needs. The sdist is made in
    this environment (the same files; an isolated one cost ~8 s more)."""
    require("a git checkout (the files a clone has)", shutil.which("git") is not None and (ROOT / ".git").exists())
    src = tmp_path_factory.mktemp("clone")
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    _sh(sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(src))
    [sdist] = dist.glob("*.tar.gz")
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as t:
        t.extractall(unpacked, filter="data")
    [root] = unpacked.iterdir()
    _sh(sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(root))
    [sdist] = dist.glob("*.tar.gz")
    [wheel] = dist.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="session")
def venv(built, tmp_path_factory):
    """A fresh virtualenv outside the checkout with the wheel installed."""
    d = tmp_path_factory.mktemp("venv")
    _sh(sys.executable, "-m", "venv", str(d))
    _sh(str(d / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--no-compile", str(built[1]))
    return d


def test_the_wheel_has_every_package_the_assets_and_the_compiled_core(built):
    sdist, wheel = built
    assert wheel.name.startswith("realtime_fleet-")   # not `realtime`: that name is taken on PyPI
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "realtime").rglob("__init__.py")}
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, f"{pkg} is not in the wheel"
    web = {p.name for p in (ROOT / "realtime" / "web").iterdir() if p.suffix in (".html", ".js", ".css")}
    for asset in web:
        assert f"realtime/web/{asset}" in names, asset
    assert "realtime/proto/realtime/v1/realtime.proto" in names   # PROTOCOL §4: the .proto ships
    vendor = ROOT / "realtime" / "web" / "vendor"
    for f in vendor.rglob("*"):   # the vendored browser libraries, with their licenses
        if f.is_file():
            assert str(f.relative_to(ROOT)) in names, f"{f} is not in the wheel"
    for ext in ("_core", "_fanout", "_ingest"):
        assert any(n.startswith(f"realtime/_core/{ext}.") and n.endswith(".so") for n in names), ext
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Name: realtime-fleet" in text and "License-Expression:" in text
    assert any(line.startswith("Requires-Dist: aiohttp") and "<4" in line for line in text.splitlines())
    assert any(line.startswith("Requires-Dist: grpcio") for line in text.splitlines())
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    for needed in ("setup.py", "pyproject.toml", "README.md", "LICENSE",
                   "realtime/_core/_core.pyx", "realtime/_core/_fanout.pyx", "realtime/_core/_ingest.pyx",
                   "tests/conftest.py"):
        assert needed in members, f"{needed} is not in the sdist"


class Installed:
    """`realtime serve` from the virtualenv, started in a directory that is
    not the checkout, with no path that leads back to it."""

    def __init__(self, venv: Path, cwd: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REALTIME_", "PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
        self.log = open(cwd / f"serve-{self.port}.log", "w")
        self.proc = subprocess.Popen([str(venv / "bin" / "realtime"), "serve", "--port", str(self.port), *args],
                                     cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path, headers=None, data=None):
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, "exited: " + Path(self.log.name).read_text()[-3000:]
            try:
                if self.get("/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("/health/ready never answered 200: " + Path(self.log.name).read_text()[-3000:])

    def stop(self):
        stop_process(self.proc)
        self.log.close()


def test_the_installed_package_is_the_one_outside_the_checkout(venv, tmp_path):
    where = _sh(str(venv / "bin" / "python"), "-c", "import realtime, realtime._core._core as c; "
                "print(realtime.__file__); print(c.__file__)", cwd=tmp_path)
    for line in where.split():
        assert line.startswith(str(venv)) and not line.startswith(str(ROOT)), line
    out = _sh(str(venv / "bin" / "python"), "-m", "realtime", "serve", "--help", cwd=tmp_path)
    assert "REALTIME_PORT" in out


async def test_the_installed_server_serves_a_websocket_client(venv, tmp_path, uid):
    s = Installed(venv, tmp_path, "--jwt-secret", SECRET, "--tick-ms", "20")
    try:
        s.wait_ready()
        vid = uid + "wheel"
        body = json.dumps([update(vid, 55.5, 37.5, status="moving", speed=10)]).encode()
        status, raw = await asyncio.to_thread(
            s.get, "/api/ingest", {"Authorization": f"Bearer {token('feeder', ['ingest'])}",
                                   "Content-Type": "application/json"}, body)
        assert status == 200 and json.loads(raw)["accepted"] == 1
        async with websockets.connect(f"ws://127.0.0.1:{s.port}/ws?token={token()}") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "subscriptions": {"vehicles": [vid]}}))
            full = None
            deadline = time.monotonic() + 10
            while full is None and time.monotonic() < deadline:
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if m["type"] == "batch":
                    full = next((x for x in m["messages"] if x["t"] == "full" and x["v"] == vid), None)
            assert full is not None and full["p"] == [55.5, 37.5]
    finally:
        s.stop()


async def test_the_installed_server_in_development_mode_serves_the_map(venv, tmp_path):
    s = Installed(venv, tmp_path)
    try:
        s.wait_ready()
        status, html = s.get("/")
        assert status == 200
        [viewer] = re.findall(rb"eyJ[\w-]+\.[\w-]+\.[\w-]+", html)   # the embedded viewer token
        for asset in ("map.js", "map.css", "realtime-client.js", "vendor/msgpack/index.mjs",
                      "vendor/leaflet/leaflet.js"):
            assert s.get(f"/static/{asset}")[0] == 200, asset
        async with websockets.connect(f"ws://127.0.0.1:{s.port}/ws?token={viewer.decode()}") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "subscriptions": {}}))
            got = None
            deadline = time.monotonic() + 20
            while got is None and time.monotonic() < deadline:   # the simulated fleet reaches it
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if m["type"] == "batch":
                    got = next((x for x in m["messages"] if x["t"] == "full"), None)
            assert got is not None and got["v"].startswith("veh_")
    finally:
        s.stop()
