"""The `realtime` command (PROTOCOL §7, issue 9): help that explains every
option, range checks on flags and REALTIME_* variables, development mode."""
import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SECRET, Client, Server, free_port, ingest, metric_value, token, update
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
def help_entries(text: str) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(group headings in order, {flag: (its group, its help text)}) from
    argparse's layout: a heading at column 0, entries indented by two, their
    wrapped help indented further."""
    groups, entries, group, flag = [], {}, None, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            group, flag = line[:-1], None
            groups.append(group)
        elif line.startswith("  --"):
            flag, _, rest = line.strip().partition(" ")
            entries[flag] = (group, rest)
        elif flag and line.startswith("    "):
            entries[flag] = (group, entries[flag][1] + " " + line.strip())
    return groups, {f: (g, " ".join(h.split())) for f, (g, h) in entries.items()}


def test_serve_help_explains_every_option_in_its_group():
    p = run("serve", "--help")
    assert p.returncode == 0, p.stderr
    groups, entries = help_entries(p.stdout)
    assert [g for g in groups if g in config.GROUPS] == list(config.GROUPS), "groups in the documented order"
    assert set(entries) == {"--" + f.name.replace("_", "-") for f in OPTIONS}
    for f in OPTIONS:
        flag, env = "--" + f.name.replace("_", "-"), "REALTIME_" + f.name.upper()
        group, text = entries[flag]
        assert group == f.metadata["spec"].group, (flag, group)
        metavar, _, text = text.partition(" ") if not text[0].isupper() else ("", "", text)
        sentence, _, rest = text.partition(" Default: ")
        assert sentence[0].isupper() and sentence.endswith("."), (flag, text)
        assert rest and rest.endswith(f"Env: {env}."), (flag, text)
    assert "Development mode" in " ".join(p.stdout.split())


def test_trusted_proxies_is_offered_and_explained():
    help_text = " ".join(run("serve", "--help").stdout.split())
    assert "--trusted-proxies CIDRS Proxies whose X-Forwarded-For is believed" in help_text
    assert "REALTIME_TRUSTED_PROXIES" in help_text


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
    ("--trusted-proxies", "10.0.0.0/8,proxy.example", "addresses or CIDRs"),
    ("--trusted-proxies", "10.0.0.0/33", "addresses or CIDRs"),
    ("--tile-url", "ftp://tiles/{z}/{x}/{y}.png", "`none` or an http(s) or /path URL template"),
    ("--tile-url", "https://tiles.example.com/tile.png", "`none` or an http(s) or /path URL template"),
    ("--tile-url", "//tiles.example.com/{z}/{x}/{y}.png", "`none` or an http(s) or /path URL template"),
    ("--port", "70000", "an integer from 1 to 65535"),
    ("--port", "http", "an integer from 1 to 65535"),
    ("--workers", "0", "from 1 to 256"),
    ("--tick-ms", "0", "from 1 to 10000 ms"),
    ("--tick-ms", "2.5", "an integer"),
    ("--heartbeat-s", "0", "from 0.1 to 3600 s"),
    ("--heartbeat-s", "1e-300", "from 0.1 to 3600 s"),
    ("--heartbeat-s", "nan", "a number"),
    ("--heartbeat-s", "inf", "a number"),
    ("--ready-max-cpu", "1.5", "above 0 and at most 1"),
    ("--ready-max-cpu", "0", "above 0 and at most 1"),
    ("--max-message-bytes", "10", "from 1024"),
    ("--simulate", "-1", "from 0 to 1000000"),
    ("--log-level", "loud", "one of debug, info, warning, error, critical"),
    ("--ws-deflate", "yes", "one of on, off"),
    ("--kafka-from", "yesterday", "one of earliest, latest, time"),
    ("--redis", "http://127.0.0.1:6379", "redis://"),
    ("--redis", "redis://", "redis://host"),
    ("--redis", "redis://127.0.0.1:99999", "port that is not from 1 to 65535"),
    ("--redis", "redis://127.0.0.1:6379/abc", "database that is not a number"),
    ("--redis", "rediscluster://127.0.0.1:7000", "redis+cluster://host:port"),
    ("--redis", "redis+cluster://127.0.0.1:99999", "port that is not from 1 to 65535"),
    ("--redis", "redis+cluster://127.0.0.1:7000/3", "a Redis Cluster has only database 0"),
    ("--redis", "redis+cluster://127.0.0.1:7000,:7001", "host:port for every node"),
    ("--redis", "redis+cluster://127.0.0.1:7000?ssl=1", "takes no ?options"),
    ("--redis", "redis+cluster://fe80::1:7000", "IPv6 node without brackets"),
    ("--redis", "redis+cluster://[::1]x", "not host:port"),
    ("--redis", "redis+cluster://h:７０００", "port that is not from 1 to 65535"),
    ("--postgres", "postgresql://h:0/db", "port that is not from 1 to 65535"),
    ("--jwt-issuer", "", "must not be empty"),
    ("--jwt-issuer", "   ", "must not be empty"),
    ("--host", "[::1]", "without brackets"),
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


def test_a_redis_cluster_url_names_its_seeds():
    from realtime.stores.redis_conn import cluster_url
    s = settings("--redis", "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,node4", "--jwt-secret", SECRET)
    assert cluster_url(s.redis) == ([("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002), ("node4", 6379)],
                                    {"ssl": False})
    assert cluster_url("rediss+cluster://app:p%40ss@h:7000/0") == ([("h", 7000)], {
        "ssl": True, "username": "app", "password": "p@ss"})
    assert cluster_url("redis+cluster://:pw@h:7000")[1] == {"ssl": False, "password": "pw"}


def test_a_password_in_a_url_is_not_repeated_in_the_error():
    msg = refused("--redis", "redis+cluster://app:s3cr3t@h:99999", "--jwt-secret", SECRET)
    assert "s3cr3t" not in msg and "app:***@h:99999" in msg, msg


def test_a_bad_variable_is_refused_naming_the_variable():
    msg = refused(env={"REALTIME_PORT": "eighty", "REALTIME_JWT_SECRET": SECRET})
    assert msg == "REALTIME_PORT='eighty': must be an integer from 1 to 65535"
    msg = refused(env={"REALTIME_READY_MAX_MEMORY": "2", "REALTIME_JWT_SECRET": SECRET})
    assert msg == "REALTIME_READY_MAX_MEMORY='2': must be a number above 0 and at most 1"


def test_an_empty_key_variable_is_refused_not_development_mode():
    assert refused(env={"REALTIME_JWT_SECRET": ""}) == "REALTIME_JWT_SECRET='': must not be empty"
    assert "must not be empty" in refused(env={"REALTIME_JWT_JWKS": ""})
    assert settings(env={"REALTIME_KAFKA": ""}).kafka is None       # other empty variables are unset


def test_a_secret_is_taken_as_it_is():
    assert settings("--jwt-secret", " s3cret\n").jwt_secret == " s3cret\n"
    assert settings("--topic", " t1 ", "--jwt-secret", SECRET).topic == "t1"


def test_key_and_certificate_files_must_parse(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    s = settings("--jwt-public-key", str(junk))
    with pytest.raises(config.ConfigError, match="not a PEM public key"):
        config.check_files(s)
    s = settings("--jwt-jwks", str(junk))
    with pytest.raises(config.ConfigError, match="not a usable JWKS document"):
        config.check_files(s)
    s = settings("--tls-cert", str(junk), "--tls-key", str(junk), "--jwt-secret", SECRET)
    with pytest.raises(config.ConfigError, match="cannot be loaded"):
        config.check_files(s)
    p = run("serve", "--jwt-jwks", str(junk), "--port", str(free_port()))
    assert p.returncode == 2 and p.stderr.startswith(f"realtime serve: --jwt-jwks {junk}: not a usable JWKS")


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


def test_development_mode_needs_hs256_for_its_map_token():
    assert "must include HS256" in refused("--jwt-algorithms", "RS256")
    assert settings("--jwt-algorithms", "HS256,RS256").development


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


async def test_with_a_key_nothing_is_simulated_unless_asked(uid):
    s = Server("--tick-ms", "50")   # conftest passes --jwt-secret
    try:
        import urllib.request
        html = urllib.request.urlopen(s.url + "/", timeout=10).read().decode()
        assert "eyJ" not in html     # no embedded token outside development mode
        # one vehicle of our own arrives; by then a simulator, were it on,
        # would have started (it starts with the server) and logged so
        ingest(s, [update(uid + "only")])
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        await c.send({"type": "subscribe", "subscriptions": {}})
        assert (await c.recv_type("subscribed"))["visible"] == 1
        assert "simulating" not in s.logs()
        assert metric_value(s, "ingest_updates_total") == 1
        await c.close()
    finally:
        s.stop()


# ---------------------------------------------------------------- an unbuilt checkout
def test_an_unbuilt_checkout_says_what_to_run(tmp_path):
    import shutil
    shutil.copytree(ROOT / "realtime", tmp_path / "realtime",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    imp = subprocess.run([sys.executable, "-c", "import realtime.hub"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env=base)
    assert imp.returncode != 0
    assert "is not built" in imp.stderr and "make build" in imp.stderr and "pip install ." in imp.stderr
    p = subprocess.run([sys.executable, "-m", "realtime", "serve", "--port", str(free_port())], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=base)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "make build" in p.stderr, p.stderr


# ---------------------------------------------------------------- realtime simulate
def test_simulate_needs_one_destination():
    for args in ([], ["--url", "http://127.0.0.1:1", "--kafka", "127.0.0.1:1"]):
        p = run("simulate", *args)
        assert p.returncode == 2 and "give --url" in p.stderr and "--kafka" in p.stderr


async def visible_all(server, at_least: int) -> int:
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    visible, deadline = 0, time.monotonic() + 20
    while visible < at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        await c.send({"type": "subscribe", "subscriptions": {}})
        visible = (await c.recv_type("subscribed", timeout=10))["visible"]
    await c.close()
    return visible


@pytest.mark.parametrize("through", ["kafka", "http"])
async def test_simulate_feeds_a_server(through, kafka_bootstrap, uid):
    if through == "kafka":
        from conftest import create_topic
        topic = "sim." + uid.strip("_")
        await create_topic(kafka_bootstrap, topic, 1)
        s = Server("--tick-ms", "50", "--kafka", kafka_bootstrap, "--topic", topic, "--kafka-from", "earliest")
        dest = ["--kafka", kafka_bootstrap, "--topic", topic]
    else:
        s = Server("--tick-ms", "50")
        dest = ["--url", s.url, "--jwt-secret", SECRET]
    try:
        p = await asyncio.to_thread(run, "simulate", *dest, "--vehicles", "50", "--rate", "500",
                                    "--duration", "1.5", timeout=60)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["sent"] > 50
        # veh_00000..veh_00049; a simulated tracker may be "offline" and silent
        assert 45 <= await visible_all(s, 45) <= 50
    finally:
        s.stop()
