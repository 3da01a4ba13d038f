"""The `realtime` command (PROTOCOL §7, issue 9): help that explains every
option, range checks on flags and REALTIME_* variables, development mode."""
import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SECRET, Client, Server, free_port, token
from realtime import config

pytestmark = pytest.mark.integration

OPTIONS = [f for f in dataclasses.fields(config.Settings) if "spec" in f.metadata]


def run(*args, env=None, timeout=30):
    """`python -m realtime ...` with only the given REALTIME_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    return subprocess.run([sys.executable, "-m", "realtime", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})})


def settings(*flags, env=None):
    """Settings from flags and an environment, as `realtime serve` makes them."""
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return config.from_args(p.parse_args(list(flags)), env=env or {})


def refused(*flags, env=None) -> str:
    with pytest.raises(config.ConfigError) as e:
        settings(*flags, env=env)
    return str(e.value)


# ---------------------------------------------------------------- help
def test_serve_help_explains_every_option_in_its_group():
    p = run("serve", "--help")
    assert p.returncode == 0, p.stderr
    out = " ".join(p.stdout.split())           # argparse wraps lines
    positions = [out.index(f"{g}: {about}") for g, about in config.GROUPS.items()]
    assert positions == sorted(positions), "groups in the documented order"
    for f in OPTIONS:
        flag, env = "--" + f.name.replace("_", "-"), "REALTIME_" + f.name.upper()
        start = out.index(flag + " ", out.index("network: "))   # its entry, past the usage line
        entry = out[start:out.index(f"Env: {env}.", start)]
        sentence = entry.split(" ", 2)[-1]
        assert sentence[0].isupper() and "." in sentence, (flag, entry)
        assert "Default: " in entry, (flag, entry)
        group = f.metadata["spec"].group
        assert positions[list(config.GROUPS).index(group)] < start, (flag, group)
    assert "Development mode" in out


def test_options_that_do_nothing_yet_are_not_offered():
    p = run("serve", "--grpc-port", "9000")
    assert p.returncode == 2 and "unrecognized arguments: --grpc-port" in p.stderr
    assert "grpc" not in run("serve", "--help").stdout


def test_python_dash_m_works_like_the_command():
    exe = os.path.join(os.path.dirname(sys.executable), "realtime")
    by_m, by_cmd = run("--help"), subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert by_m.returncode == by_cmd.returncode == 0
    assert by_m.stdout.replace("__main__.py", "realtime") == by_cmd.stdout
    for sub in ("serve", "token", "simulate"):
        assert sub in by_m.stdout


# ---------------------------------------------------------------- range checks
@pytest.mark.parametrize("flag,value,allowed", [
    ("--port", "0", "an integer from 1 to 65535"),
    ("--port", "70000", "an integer from 1 to 65535"),
    ("--port", "http", "an integer from 1 to 65535"),
    ("--workers", "0", "from 1 to 256"),
    ("--tick-ms", "0", "from 1 to 10000 ms"),
    ("--tick-ms", "2.5", "an integer"),
    ("--heartbeat-s", "0", "above 0"),
    ("--heartbeat-s", "nan", "a number"),
    ("--heartbeat-s", "inf", "a number"),
    ("--ready-max-cpu", "1.5", "above 0 and at most 1"),
    ("--max-message-bytes", "10", "from 1024"),
    ("--simulate", "-1", "from 0 to 1000000"),
    ("--log-level", "loud", "one of debug, info, warning, error, critical"),
    ("--ws-deflate", "yes", "one of on, off"),
    ("--kafka-from", "yesterday", "one of earliest, latest, time"),
    ("--redis", "http://127.0.0.1:6379", "redis://"),
    ("--postgres", "mysql://x", "postgresql://"),
    ("--kafka", "broker", "host:port"),
    ("--topic", "bad topic", "Kafka topic name"),
    ("--allowed-origins", "dispatch.example.com", "origins such as https://"),
    ("--jwt-algorithms", "none", "comma-separated list of HS256"),
    ("--jwt-public-key", "/nonexistent/key.pem", "no such file"),
    ("--host", "127.0.0.1/8", "an IP address or a host name"),
])
def test_a_bad_flag_is_refused_naming_the_flag_the_value_and_what_is_allowed(flag, value, allowed):
    msg = refused(flag, value, "--jwt-secret", SECRET)
    assert msg.startswith(f"{flag} '{value}': must be") or msg.startswith(f"{flag} '{value}': "), msg
    assert allowed in msg, msg


def test_a_bad_variable_is_refused_naming_the_variable():
    msg = refused(env={"REALTIME_PORT": "eighty", "REALTIME_JWT_SECRET": SECRET})
    assert msg == "REALTIME_PORT='eighty': must be an integer from 1 to 65535"
    msg = refused(env={"REALTIME_READY_MAX_MEMORY": "2", "REALTIME_JWT_SECRET": SECRET})
    assert msg.startswith("REALTIME_READY_MAX_MEMORY='2': must be a number above 0 and at most 1")


def test_flags_win_over_variables_and_empty_variables_are_unset():
    s = settings("--port", "9001", env={"REALTIME_PORT": "9002", "REALTIME_TICK_MS": "",
                                        "REALTIME_JWT_SECRET": SECRET})
    assert s.port == 9001 and s.tick_ms == 50


@pytest.mark.parametrize("args,env,words", [
    (["--offline-after-s", "600", "--stale-after-s", "600"], {},
     ["--offline-after-s (600) must be below --stale-after-s (600)"]),
    (["--offline-after-s", "9000"], {}, ["--offline-after-s (9000) must be below --stale-after-s (7200)"]),
    ([], {"REALTIME_STALE_AFTER_S": "100"}, ["--offline-after-s (300) must be below REALTIME_STALE_AFTER_S (100)"]),
    (["--heartbeat-s", "60"], {}, ["--pong-timeout-s (60) must be above --heartbeat-s (60)"]),
    (["--slow-client-buffer-bytes", "20000000"], {},
     ["--slow-client-buffer-bytes (20000000) must be below --write-buffer-close-bytes (16777216)"]),
    (["--tls-cert", __file__], {}, ["--tls-cert and --tls-key go together"]),
    (["--kafka", "127.0.0.1:9092", "--dead-letter-topic", "vehicle.updates.enriched"], {},
     ["--dead-letter-topic must differ from --topic"]),
    (["--dead-letter-topic", "dlq"], {}, ["--dead-letter-topic needs --kafka"]),
    (["--workers", "2"], {}, ["--workers 2 needs --redis"]),
    (["--jwt-public-key", __file__], {}, ["--jwt-secret excludes --jwt-public-key"]),
    (["--jwt-algorithms", "RS256"], {}, ["--jwt-secret signs only HS256, HS384 or HS512"]),
])
def test_options_that_depend_on_each_other_are_checked(args, env, words):
    msg = refused(*args, "--jwt-secret", SECRET, env=env)
    for w in words:
        assert w in msg, msg


def test_a_public_key_refuses_hmac_algorithms():
    msg = refused("--jwt-public-key", __file__, "--jwt-algorithms", "RS256,HS384")
    assert "HS384 needs --jwt-secret" in msg


def test_refused_at_start_with_exit_status_2_and_one_line():
    p = run("serve", "--port", "99999")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["realtime serve: --port '99999': must be an integer from 1 to 65535"]
    p = run("serve", env={"REALTIME_SLOW_CLIENT_MAX_EVENTS": "0"})
    assert p.returncode == 2 and "REALTIME_SLOW_CLIENT_MAX_EVENTS='0'" in p.stderr


# ---------------------------------------------------------------- development mode
def test_development_mode_is_no_key_of_any_kind():
    s = settings()
    assert s.development and s.simulate_count == 2000
    assert settings("--simulate", "5").simulate_count == 5
    keyed = settings("--jwt-secret", SECRET)
    assert not keyed.development and keyed.simulate_count == 0
    assert settings("--jwt-secret", SECRET, "--simulate", "7").simulate_count == 7
    assert not settings("--jwt-jwks", __file__).development
    assert not settings(env={"REALTIME_JWT_PUBLIC_KEY": __file__}).development


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "dispatch.example.com"])
def test_development_mode_refuses_a_non_loopback_host_and_says_what_to_pass(host):
    msg = refused("--host", host)
    assert f"--host {host} is not a loopback address" in msg
    assert "--jwt-secret" in msg and "127.0.0.1" in msg
    assert settings("--host", host, "--jwt-secret", SECRET).host == host   # with a key it may
    assert f"REALTIME_HOST {host}" in refused(env={"REALTIME_HOST": host})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_development_mode_serves_loopback_hosts(host):
    assert settings("--host", host).development


def test_development_mode_refusal_from_the_command():
    p = run("serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert p.returncode == 2 and "not a loopback address" in p.stderr and "--jwt-secret" in p.stderr


async def test_development_server_simulates_2000_and_its_map_carries_a_working_token():
    s = Server("--tick-ms", "50", secret=None)
    try:
        import re
        import urllib.error
        import urllib.request
        html = urllib.request.urlopen(s.url + "/", timeout=10).read().decode()
        found = re.findall(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", html)
        assert found, "no token in the map page"
        c = await Client.connect(s, found[0])
        await c.recv_type("welcome")
        # each simulated vehicle reports about once a second; a few trackers
        # are "offline" in the simulation and stay silent
        visible, deadline = 0, time.monotonic() + 20
        while visible < 1990 and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            await c.send({"type": "subscribe", "subscriptions": {}})
            visible = (await c.recv_type("subscribed", timeout=10))["visible"]
        assert 1990 <= visible <= 2000
        auth = {"Authorization": f"Bearer {found[0]}"}
        last = urllib.request.Request(s.url + "/api/vehicles/veh_02000", headers=auth)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(last, timeout=10)
        assert e.value.code == 404      # 2000 vehicles: veh_00000 to veh_01999
        await c.close()
    finally:
        s.stop()


async def test_with_a_key_nothing_is_simulated_unless_asked():
    s = Server("--tick-ms", "50")   # conftest passes --jwt-secret
    try:
        import urllib.request
        html = urllib.request.urlopen(s.url + "/", timeout=10).read().decode()
        assert "eyJ" not in html     # no embedded token outside development mode
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        time.sleep(1.0)              # the simulator, were it on, steps every 100 ms
        await c.send({"type": "subscribe", "subscriptions": {}})
        assert (await c.recv_type("subscribed"))["visible"] == 0
        await c.close()
    finally:
        s.stop()
